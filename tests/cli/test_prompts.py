"""Where the prompt comes from: an argument, ``-p``, ``-f FILE``, ``-`` or a pipe; never
a hidden default; bad bytes and missing files as one clear line."""

from __future__ import annotations

import io
import json

import pytest

from ssd_core import ConfigError, InputError
from ssd_core.app.cli import build_parser, main
from ssd_core.app.console import read_prompt

from .helpers import REF, run_ssd


class FakeStdin(io.TextIOWrapper):
    def __init__(self, data: bytes, tty: bool = False) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def args_for(*argv: str):
    return build_parser().parse_args(["generate", *argv])


def test_positional_p_and_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("héllo\nworld\n".encode())
    tty = FakeStdin(b"", tty=True)
    assert read_prompt(args_for("abc"), tty) == "abc"
    assert read_prompt(args_for("-p", "abc"), tty) == "abc"
    assert read_prompt(args_for("-f", str(f)), tty) == "héllo\nworld"  # one newline dropped


def test_dash_and_pipe_read_stdin():
    assert read_prompt(args_for("-"), FakeStdin(b"from stdin\n")) == "from stdin"
    assert read_prompt(args_for("-f", "-"), FakeStdin(b"x\r\n")) == "x"
    assert read_prompt(args_for(), FakeStdin(b"piped\n\n")) == "piped\n"


def test_a_given_prompt_wins_over_a_pipe():
    assert read_prompt(args_for("arg"), FakeStdin(b"piped")) == "arg"


def test_no_prompt_on_a_terminal_is_an_error_not_a_hidden_default():
    with pytest.raises(InputError, match="no prompt"):
        read_prompt(args_for(), FakeStdin(b"", tty=True))


@pytest.mark.parametrize("data", [b"", b"\n", b"   \n"])
def test_an_empty_pipe_is_an_error(data):
    with pytest.raises(InputError, match="no prompt: stdin is empty"):
        read_prompt(args_for(), FakeStdin(data))


def test_two_sources_are_an_error():
    with pytest.raises(ConfigError, match="give the prompt once"):
        read_prompt(args_for("a", "-p", "b"), FakeStdin(b""))
    with pytest.raises(ConfigError, match="give the prompt once"):
        read_prompt(args_for("-p", "a", "-f", "x"), FakeStdin(b""))


def test_non_utf8_bytes_are_a_clear_error(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InputError, match=r"not UTF-8 text \(byte 0xe9 at offset 3\)"):
        read_prompt(args_for("-f", str(f)), FakeStdin(b""))
    with pytest.raises(InputError, match="from stdin is not UTF-8"):
        read_prompt(args_for(), FakeStdin(b"\xff\xfe"))
    with pytest.raises(InputError, match="not UTF-8"):
        read_prompt(args_for("caf\udce9"), FakeStdin(b""))


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="cannot read the prompt file .*No such file"):
        read_prompt(args_for("-f", str(tmp_path / "nope.txt")), FakeStdin(b""))


def test_main_reads_a_pipe(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", FakeStdin(b"4 5 6\n"))
    assert main(["generate", *REF, "-n", "5", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["usage"]["prompt_tokens"] == 3 and len(obj["tokens"]) == 5


def test_main_refuses_no_prompt_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", FakeStdin(b"", tty=True))
    assert main(["generate", *REF]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ssd: error: no prompt") and err.count("\n") == 1


def test_the_same_tokens_from_every_source(tmp_path):
    """A real pipe, -f, - and the argument give the same run (child processes)."""
    f = tmp_path / "p.txt"
    f.write_text("7 8 9\n")
    flags = [*REF, "-n", "6", "--json"]
    runs = [
        run_ssd("generate", *flags, "7 8 9"),
        run_ssd("generate", *flags, input=b"7 8 9\n"),
        run_ssd("generate", *flags, "-", input=b"7 8 9"),
        run_ssd("generate", *flags, "-f", str(f)),
    ]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert len({json.dumps(json.loads(r.stdout)["tokens"]) for r in runs}) == 1
