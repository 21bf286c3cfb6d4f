"""What ``ssd generate`` prints: text rendered the same on every backend, stop strings
held back until certain, ``--json`` with finish reason and usage, one line (never a
traceback) for errors and signals, and the exit codes."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import time

import pytest

from backends.reference import ReferenceModel
from ssd_core.app import cli
from ssd_core.app.console import Renderer

from .helpers import REF, ROOT, run_ssd, ssd_command, ssd_env

EOS = 300


class TorchLikeTokenizer:
    """Renders the end-of-turn token as text, as transformers' decode does."""

    eos_token_ids = (EOS,)

    def decode(self, ids):
        return "".join("<|im_end|>" if t == EOS else chr(t) for t in ids)


class LlamaLikeTokenizer:
    """Drops control tokens unless asked, as llama.cpp's detokenizer does."""

    eos_token_ids = (EOS,)

    def decode(self, ids, *, render_special=False):
        return "".join(
            ("<|im_end|>" if render_special else "") if t == EOS else chr(t) for t in ids
        )


def render(tok, chunks, **kw):
    r = Renderer(tok, **kw)
    shown = "".join(r.add(c) for c in chunks) + r.finish()
    assert shown == r.text
    return shown


HI = [ord(c) for c in "Hi there!"]


@pytest.mark.parametrize("tok", [TorchLikeTokenizer(), LlamaLikeTokenizer()])
def test_end_of_text_is_hidden_the_same_way_on_every_backend(tok):
    assert render(tok, [HI[:3], HI[3:], [EOS]]) == "Hi there!"
    assert render(tok, [HI, [EOS]], special=True) == "Hi there!<|im_end|>"
    # --ignore-eos: an end token in the middle is hidden too
    assert render(tok, [HI[:2], [EOS], HI[2:]]) == "Hi there!"


def test_stop_string_across_token_boundaries_is_never_shown():
    tok = TorchLikeTokenizer()
    r = Renderer(tok, stops=("\n\n",))
    shown = [r.add([ord("a"), ord("b")]), r.add([ord("\n")])]
    assert "".join(shown) == "ab"  # the newline is held back: it may start the stop
    shown.append(r.add([ord("\n"), ord("c")]))
    shown.append(r.finish())
    assert "".join(shown) == "ab" and r.text == "ab"


def test_only_a_tail_that_could_begin_a_stop_is_held_back():
    r = Renderer(TorchLikeTokenizer(), stops=("xyz", "ab!"))
    assert r.add([ord(c) for c in "abcx"]) == "abc"
    assert r.add([ord("y")]) == ""
    assert r.add([ord("q")]) == "xyq"
    assert r.add([ord("a")]) == ""
    assert r.finish() == "a"


def test_incomplete_utf8_is_held_back():
    class Bytes:
        eos_token_ids = ()

        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    r = Renderer(Bytes())
    euro = list("€".encode())
    assert r.add([ord("a"), euro[0]]) == "a"
    assert r.add(euro[1:]) == "€"


def test_id_only_models_render_ids():
    assert render(None, [[1, 2], [3]]) == "1 2 3"


# -- the command ---------------------------------------------------------------------


def test_json_has_finish_reason_usage_and_metrics(capsys):
    assert cli.main(["generate", *REF, "-n", "9", "--json", "5 6 7"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["finish_reason"] == "length" and obj["stop"] is None
    assert obj["usage"] == {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}
    assert obj["metrics"]["generated_tokens"] == 9 and obj["text"] is None


def test_context_limit_is_announced(capsys):
    target = "reference:vocab=64,order=2,seed=1,context=10"
    assert cli.main(["generate", "--backend", "reference", "-m", target, "-n", "50", "1 2 3"]) == 0
    err = capsys.readouterr().err
    assert "stopped at the target's context size (10 tokens; the prompt has 3, 8 were" in err
    assert "raise it with -c/--ctx-size" in err


class FailingModel(ReferenceModel):
    """A target whose backend raises after a few verification calls."""

    calls = 0

    def extend(self, requests):
        FailingModel.calls += 1
        if FailingModel.calls > 3:
            raise RuntimeError("device lost")
        return super().extend(requests)


def test_a_backend_failure_exits_1_and_json_keeps_the_partial(monkeypatch, capsys):
    FailingModel.calls = 0
    target = ReferenceModel.random(vocab_size=64, order=2, seed=1)
    target.__class__ = FailingModel
    monkeypatch.setattr(cli, "load_models", lambda *a, **k: (target, None))
    rc = cli.main(
        ["generate", *REF, "--mode", "ar", "--driver", "sequential", "-n", "20", "--json", "1 2"]
    )
    out = capsys.readouterr()
    assert rc == 1
    obj = json.loads(out.out)
    assert 1 <= len(obj["tokens"]) < 20 and "device lost" in obj["error"]
    assert obj["usage"]["completion_tokens"] == len(obj["tokens"])
    assert "Traceback" not in out.err and "device lost" in out.err


SLOW_REF = ["--backend", "reference", "-m", "reference:vocab=64,order=2,seed=1,token_ms=5"]


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ssd_command(*args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ssd_env(),
        cwd=ROOT,
    )


def _wait_for_tokens(p: subprocess.Popen[str], seconds: float = 2.0) -> None:
    # Long enough for the engine to commit tokens; the run itself would take minutes.
    time.sleep(seconds)
    assert p.poll() is None


def test_ctrl_c_exits_130_and_json_keeps_what_was_generated():
    p = _start("generate", *SLOW_REF, "-n", "100000", "--json", "1")
    _wait_for_tokens(p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130
    obj = json.loads(out)
    assert obj["finish_reason"] == "cancelled" and len(obj["tokens"]) > 0
    assert err.strip().splitlines()[-1] == "ssd: interrupted" and "Traceback" not in err


def test_ctrl_c_while_streaming_text():
    p = _start("generate", *SLOW_REF, "-n", "100000", "1")
    _wait_for_tokens(p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and out.split()  # the ids written so far
    assert "ssd: interrupted" in err and "Traceback" not in err


def test_sigterm_exits_143_quietly():
    p = _start("generate", *SLOW_REF, "-n", "100000", "1")
    _wait_for_tokens(p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and "Traceback" not in err and "terminated" in err


def test_a_closed_pipe_is_quiet():
    """``ssd generate ... | head -c 5``: no traceback, stops early, exit 141."""
    cmd = " ".join(ssd_command("generate", *SLOW_REF, "-n", "100000", "1"))
    r = subprocess.run(
        ["bash", "-c", f'{cmd} | head -c 5; echo " rc=${{PIPESTATUS[0]}}"'],
        capture_output=True,
        text=True,
        env=ssd_env(),
        cwd=ROOT,
        timeout=120,
    )
    assert r.stdout.endswith(" rc=141\n") and len(r.stdout) == 5 + len(" rc=141\n")
    assert r.stderr == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", *REF, "--k", "0", "1"],
        ["generate", *REF, "--temp", "-1", "1"],
        ["generate", "--backend", "nope", "1"],
        ["generate", *REF, "--stop", "x", "1"],
        ["generate", *REF, "hello"],
        ["generate", *REF, "-f", "/nonexistent/prompt.txt"],
        ["bench", *REF, "--limit", "0"],
        ["bench", *REF, "--limit", "-1"],
        ["bench", *REF, "--prompts", "/nonexistent.json"],
        ["bench", *REF, "--modes", "ar,fast"],
        ["chat", *REF, "--system", "be nice"],
        ["generate", "-n"],
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(argv):
    r = run_ssd(*argv, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("ssd")


# -- progress on slow steps ------------------------------------------------------------


class Sink(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_progress_line_for_a_slow_step():
    from ssd_core.app.console import Progress

    log = Sink(tty=False)
    with Progress("loading target x", stream=log, delay=0.0):
        pass
    assert log.getvalue().startswith("ssd: loading target x ... done in ")
    tty = Sink(tty=True)
    with Progress("loading target x", stream=tty, delay=0.0):
        time.sleep(0.2)  # gives the ticker a chance to draw; nothing is timed
    assert "ssd: loading target x ... done in " in tty.getvalue()
    assert tty.getvalue().endswith("\n")
    quiet = Sink(tty=True)
    with Progress("loading target x", stream=quiet, enabled=False, delay=0.0):
        pass
    assert quiet.getvalue() == ""
    fast = Sink(tty=False)
    with Progress("loading target x", stream=fast, delay=60.0):
        pass
    assert fast.getvalue() == ""  # a quick step leaves no line


def test_json_runs_load_without_progress(monkeypatch, capsys):
    seen = []
    real = cli.load_models

    def spy(*a, **k):
        seen.append(k["quiet"])
        return real(*a, **k)

    monkeypatch.setattr(cli, "load_models", spy)
    assert cli.main(["generate", *REF, "-n", "2", "--json", "1"]) == 0
    assert cli.main(["generate", *REF, "-n", "2", "1"]) == 0
    assert seen == [True, False]
