"""``ssd chat`` through a pseudo-terminal: streaming, a stats line per turn, Ctrl-C stops
a reply without leaving, /reset, /exit and Ctrl-D; on the reference backend (token ids)
and on a tiny llama.cpp GGUF (chat template, system prompt)."""

from __future__ import annotations

import subprocess

import pytest

from backends.reference import ReferenceModel
from ssd_core import ConfigError, InputError
from ssd_core.app.chat import ChatSession
from ssd_core.app.console import Reply

from .helpers import ROOT, ssd_command, ssd_env

pexpect = pytest.importorskip("pexpect")

STATS = r"\[\d+ tokens in [\d.]+ s \([\d.]+ tok/s\)[^\]]*finish: [^\]]+\]"


def spawn(*args: str):
    cmd = ssd_command("chat", *args)
    child = pexpect.spawn(
        cmd[0], cmd[1:], env=ssd_env(), cwd=str(ROOT), encoding="utf-8",
        codec_errors="replace", timeout=60, dimensions=(40, 200),
    )  # fmt: skip
    return child


def test_chat_on_the_reference_backend():
    slow = "reference:vocab=64,order=2,seed=1,token_ms=20"
    c = spawn("--backend", "reference", "-m", slow, "-n", "100000")
    try:
        c.expect("chatting with reference")
        c.expect("> ")
        c.sendline("1 2 3")
        c.expect(r"(\d+ ){4}")  # token ids stream while the reply runs
        c.sendintr()  # Ctrl-C stops the reply, not the session
        c.expect(STATS)
        assert "finish: stopped (Ctrl-C)" in c.after
        c.expect("> ")
        c.sendline("4 5")
        c.expect(r"(\d+ ){2}")
        c.sendintr()
        c.expect("stopped")
        c.expect("> ")
        c.sendline("/reset")
        c.expect("history cleared")
        c.expect("> ")
        c.sendline("/nope")
        c.expect("unknown command /nope")
        c.expect("> ")
        c.sendintr()  # at the prompt: a hint, still in the session
        c.expect("Ctrl-D or /exit leaves")
        c.expect("> ")
        c.sendline("/exit")
        c.expect(pexpect.EOF)
    finally:
        c.close()
    assert c.exitstatus == 0, c.before


def test_chat_short_replies_and_ctrl_d():
    c = spawn("--backend", "reference", "-n", "5")
    try:
        c.expect("> ")
        c.sendline("7 8")
        c.expect(r"\d+ \d+ \d+ \d+ \d+\r\n")
        c.expect(STATS)
        assert "finish: length" in c.after
        c.expect("> ")
        c.sendline("hello")  # text for an id-only model: an error line, the session goes on
        c.expect("has no tokenizer")
        c.expect("> ")
        c.sendeof()
        c.expect(pexpect.EOF)
    finally:
        c.close()
    assert c.exitstatus == 0


def test_chat_on_a_tiny_llama_gguf(tiny_gguf):
    c = spawn("-m", str(tiny_gguf), "-t", "1", "-c", "512", "-n", "6", "--system", "be brief")
    try:
        c.expect("> ")
        c.sendline("the cat")
        c.expect(STATS)
        c.expect("> ")
        c.sendline("and the dog")
        c.expect(STATS)
        c.expect("> ")
        c.sendline("/quit")
        c.expect(pexpect.EOF)
    finally:
        c.close()
    assert c.exitstatus == 0
    assert "<|im_end|>" not in c.before


def test_chat_reads_a_pipe_without_prompts():
    r = subprocess.run(
        ssd_command("chat", "--backend", "reference", "-n", "3"),
        input="1 2\n3\n",
        capture_output=True,
        text=True,
        env=ssd_env(),
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all(len(line.split()) == 3 for line in lines)
    assert r.stderr.count("finish: length") == 2 and "> " not in r.stdout


# -- the session's history -------------------------------------------------------------


class Templated(ReferenceModel):
    """A reference model with a chat template that spells out the messages as ids."""

    def apply_chat_template(self, messages):
        ids = []
        for m in messages:
            ids += [1 if m["role"] == "system" else 2 if m["role"] == "user" else 3]
            ids += [int(x) for x in m["content"].split()]
        return ids + [3]


def _reply(tokens, text=None):
    from ssd_core import RequestResult

    r = RequestResult(
        tokens=tuple(tokens), text=text, finish_reason="length", stop=None, prompt_tokens=0,
        metrics=None, first_token_s=None, total_s=None,
    )  # fmt: skip
    return Reply(result=r, text=text)


def test_history_with_a_template_and_reset():
    target = ReferenceModel.random(vocab_size=64, order=2, seed=1)
    target.__class__ = Templated
    s = ChatSession(target, system="9")
    assert s.kind == "template"
    p1 = s.prompt_for("5 6")
    assert p1 == [1, 9, 2, 5, 6, 3]
    s.commit("5 6", p1, _reply([7, 8], text="7 8"))
    assert s.prompt_for("4") == [1, 9, 2, 5, 6, 3, 7, 8, 2, 4, 3]
    assert s.turns == 1
    s.reset()
    assert s.prompt_for("4") == [1, 9, 2, 4, 3] and s.turns == 0


def test_history_of_ids():
    s = ChatSession(ReferenceModel.random(vocab_size=64, order=2, seed=1))
    assert s.kind == "ids"
    p = s.prompt_for("1 2")
    s.commit("1 2", p, _reply([3, 4]))
    assert s.prompt_for("5") == [1, 2, 3, 4, 5]
    with pytest.raises(InputError, match="no tokenizer"):
        s.prompt_for("hello")
    with pytest.raises(ConfigError, match="--system needs a chat template"):
        ChatSession(ReferenceModel.random(vocab_size=64, order=2, seed=1), system="hi")


class CharTokenizer:
    eos_token_ids = (0,)

    def encode(self, text, *, add_special_tokens=True):
        return [ord(c) % 64 or 1 for c in text]

    def decode(self, ids):
        return "".join(chr(t) for t in ids)


class Texted(ReferenceModel):
    """A reference model with a tokenizer but no chat template."""

    @property
    def tokenizer(self):
        return CharTokenizer()


def test_history_as_a_transcript_without_a_template():
    target = ReferenceModel.random(vocab_size=64, order=2, seed=1)
    target.__class__ = Texted
    s = ChatSession(target)
    assert s.kind == "text"
    tok = CharTokenizer()
    p = s.prompt_for("ab")
    assert p == tok.encode("ab\n")
    s.commit("ab", p, _reply([3], text="cd"))
    assert s.prompt_for("ef") == tok.encode("ab\ncd\nef\n")
