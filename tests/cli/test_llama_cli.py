"""The command line on llama.cpp: text stop strings, end-of-text tokens rendered like
torch's, the llama.cpp flags reaching the backend, llama.cpp's logs only with ``-v``;
and (slow) ``-fa off`` reproducing llama-cpp-python's greedy tokens on SmolLM2."""

from __future__ import annotations

import json

import pytest

from ssd_core.app.cli import build_parser, main
from ssd_core.app.common import load_models
from ssd_core.app.console import Renderer

from .helpers import run_ssd

pytest.importorskip("llama_cpp")


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_flags_reach_the_llama_backend(tiny_gguf):
    args = build_parser().parse_args(
        ["generate", "-m", str(tiny_gguf), "-md", str(tiny_gguf), "-c", "300", "-t", "1",
         "-fa", "off", "x"]
    )  # fmt: skip
    target, draft = load_models(args, need_draft=True, slots=1, quiet=True)
    try:
        assert target.options.flash_attn == "off" and draft.options.flash_attn == "off"
        assert target.options.n_ctx == 300 and target.options.n_threads == 1
        assert target.options.n_seq_max == 1  # one request at a time: one slot of -c cells
        assert draft.options.n_seq_max > 1  # the draft's tree keeps its own default
        assert target.options.verbose is False
    finally:
        target.free()
        draft.free()
    args = build_parser().parse_args(["generate", "-m", str(tiny_gguf), "--n-seq", "3", "x"])
    target, _ = load_models(args, need_draft=False, slots=1, quiet=True)
    assert target.options.n_seq_max == 3
    target.free()


def test_stop_string_on_decoded_text(tiny_gguf, capsys):
    base = ["generate", "-m", str(tiny_gguf), "-t", "1", "-n", "24", "--json", "--ignore-eos"]
    full = _json(capsys, [*base, "the cat and the"])
    text = full["text"]
    # a stop string from the middle of the text, spanning characters of several tokens
    at = next(
        i for i in range(3, len(text) - 3) if text[i : i + 3].isascii() and text[i : i + 3].strip()
    )
    stop = text[at : at + 3]
    cut = _json(capsys, [*base, "--stop", stop, "the cat and the"])
    assert cut["finish_reason"] == "stop" and cut["stop"] == stop
    assert cut["text"] == text[: text.find(stop)]
    assert cut["tokens"] == full["tokens"][: len(cut["tokens"])]
    assert len(cut["tokens"]) < len(full["tokens"])


def test_end_of_text_hidden_unless_special(tiny_gguf):
    from backends.llama_cpp import from_gguf

    model = from_gguf(tiny_gguf, n_threads=1, n_ctx=64, n_seq_max=1)
    try:
        tok = model.tokenizer
        ids = tok.encode("the cat", add_special_tokens=False)
        im_end = 4  # the tiny vocabulary's end of turn (an EOS id)
        assert im_end in tok.eos_token_ids
        plain = Renderer(tok)
        text = plain.add(ids + [im_end]) + plain.finish()
        assert text == tok.decode(ids) and "<|im_end|>" not in text
        special = Renderer(tok, special=True)
        text = special.add(ids + [im_end]) + special.finish()
        assert text.endswith("<|im_end|>")
    finally:
        model.free()


def test_llama_logs_only_with_verbose(tiny_gguf):
    quiet = run_ssd("generate", "-m", str(tiny_gguf), "-t", "1", "-n", "3", "the")
    assert quiet.returncode == 0
    err = quiet.stderr.decode()
    assert "llama_model_loader" not in err and len(err.strip().splitlines()) == 1
    loud = run_ssd("generate", "-v", "-m", str(tiny_gguf), "-t", "1", "-n", "3", "the")
    assert loud.returncode == 0 and "llama_model_loader" in loud.stderr.decode()


def test_chat_template_and_system(tiny_gguf, capsys):
    obj = _json(
        capsys,
        ["generate", "-m", str(tiny_gguf), "-t", "1", "-n", "3", "--json", "--system", "be brief",
         "hello"],
    )  # fmt: skip
    from backends.llama_cpp import from_gguf

    model = from_gguf(tiny_gguf, n_threads=1, n_ctx=128, n_seq_max=1)
    try:
        expect = model.apply_chat_template(
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
        )
    finally:
        model.free()
    assert obj["usage"]["prompt_tokens"] == len(expect)


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "List three colors:",
]


@pytest.mark.slow
def test_flash_attn_off_gives_llama_cpp_pythons_greedy_tokens():
    """The issue's check: ``ssd generate -m PATH -n 32 --temp 0 -fa off`` on the bundled
    SmolLM2 gives llama-cpp-python's default (flash attention off) greedy tokens."""
    from llama_cpp import Llama

    from backends.llama_cpp import smollm2_path

    try:
        path = str(smollm2_path())
    except Exception as exc:  # the bundled model is an optional download
        pytest.skip(str(exc))
    llm = Llama(model_path=path, n_ctx=512, n_threads=1, verbose=False)
    for prompt in PROMPTS:
        ref: list[int] = []
        for t in llm.generate(llm.tokenize(prompt.encode(), add_bos=True), temp=0.0, reset=True):
            if t == llm.token_eos() or len(ref) == 32:
                break
            ref.append(t)
        r = run_ssd("generate", "-m", path, "-n", "32", "--temp", "0", "-fa", "off", "-t", "1",
                    "--json", prompt, timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)["tokens"]
        assert got[: len(ref)] == ref, prompt
