"""``ssd chat``: an interactive multi-turn session on one :class:`~ssd_core.Engine`.

Every turn renders the whole conversation through the target's chat template and
submits it as a new request (the engine keeps no state between requests), streams the
reply token by token, and ends with a stats line on stderr. Ctrl-C stops the reply
being written (the partial reply stays in the history); Ctrl-D, ``/exit`` or
``/quit`` leaves; ``/reset`` clears the history.

Models without a chat template: a model with a tokenizer continues the running
transcript (each turn is a line); an id-only model (the reference backend) takes token
ids and continues the concatenated ids.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from ssd_core import ConfigError, Engine, InputError, Model

from .common import (
    add_decode_args,
    add_mode_arg,
    add_model_args,
    add_output_args,
    budget,
    check_decode_args,
    check_model_args,
    defaults_epilog,
    free_models,
    load_models,
    new_command,
)
from .console import (
    Renderer,
    Reply,
    Terminated,
    check_stops,
    describe,
    encode_messages,
    note,
    run_reply,
    write_stdout,
)

__all__ = ["COMMANDS_HELP", "ChatSession", "add_chat_parser", "run_chat"]

#: The default reply budget: a chat reply is longer than a one-shot test generation.
CHAT_MAX_NEW_TOKENS = 512

COMMANDS_HELP = (
    "/exit or /quit (or Ctrl-D) leaves, /reset clears the history, /help shows this; "
    "Ctrl-C stops the reply being written; start a message with // to send a literal /"
)


def add_chat_parser(sub: Any) -> argparse.ArgumentParser:
    p = new_command(
        sub,
        "chat",
        help="an interactive multi-turn chat (history, streaming, stats per turn)",
        description="Talk to the target through its chat template, one line per message. "
        + COMMANDS_HELP
        + ". A reply budget (-n) applies per turn.",
        epilog=defaults_epilog(),
    )
    add_mode_arg(p)
    p.add_argument(
        "--system",
        metavar="TEXT",
        help="system message at the start of the conversation (default: none)",
    )
    add_output_args(p)
    add_model_args(p)
    add_decode_args(p)
    p.set_defaults(func=run_chat, max_new_tokens=CHAT_MAX_NEW_TOKENS)
    return p


class ChatSession:
    """The conversation so far and how a turn becomes a prompt.

    Args:
        target: the target model.
        system: a system message (needs a chat template).

    Raises:
        ConfigError: ``system`` on a model without a chat template.
    """

    def __init__(self, target: Model, system: str | None = None) -> None:
        self.target = target
        self.system = system
        tok = getattr(target, "tokenizer", None)
        if getattr(target, "apply_chat_template", None) is not None:
            self.kind = "template"
        elif tok is not None:
            self.kind = "text"
        else:
            self.kind = "ids"
        if system is not None and self.kind != "template":
            raise ConfigError(
                f"--system needs a chat template; model {getattr(target, 'name', '?')!r} has none"
            )
        self.reset()

    def reset(self) -> None:
        """Forget every turn (the system message stays)."""
        self.messages: list[dict[str, str]] = []
        if self.system is not None:
            self.messages.append({"role": "system", "content": self.system})
        self.transcript = ""
        self.ids: list[int] = []
        #: Turns in the history.
        self.turns = 0

    def prompt_for(self, text: str) -> list[int]:
        """The prompt ids for the next user message.

        Raises:
            InputError: text for an id-only model.
        """
        if self.kind == "template":
            return encode_messages(self.target, [*self.messages, {"role": "user", "content": text}])
        if self.kind == "text":
            return list(self.target.tokenizer.encode(self.transcript + text + "\n"))  # type: ignore[union-attr]
        raw = text.replace(",", " ").split()
        try:
            return self.ids + [int(x) for x in raw]
        except ValueError:
            raise InputError(
                f"model {getattr(self.target, 'name', '?')!r} has no tokenizer: type token "
                "ids (e.g. 1 2 3)"
            ) from None

    def commit(self, text: str, prompt: list[int], reply: Reply) -> None:
        """Add a finished (or stopped) turn to the history."""
        if self.kind == "template":
            self.messages.append({"role": "user", "content": text})
            self.messages.append({"role": "assistant", "content": reply.text or ""})
        elif self.kind == "text":
            self.transcript += text + "\n" + (reply.text or "") + "\n"
        else:
            self.ids = prompt + reply.tokens
        self.turns += 1


def _stats(reply: Reply) -> str:
    r = reply.result
    if r is None:
        return "no result"
    n = len(r.tokens)
    total = r.total_s or 0.0
    parts = [f"{n} tokens in {total:.2f} s ({n / total if total else 0.0:.1f} tok/s)"]
    if r.first_token_s is not None:
        parts.append(f"first token {r.first_token_s:.2f} s")
    m = r.metrics
    if m is not None and m.proposed_tokens:
        parts.append(f"acceptance {m.acceptance_per_token:.0%} per token")
    if m is not None and m.cache_lookups:
        parts.append(f"cache hits {m.cache_hit_rate:.0%}")
    parts.append(f"finish: {'stopped (Ctrl-C)' if reply.interrupted else r.finish_reason}")
    return "[" + ", ".join(parts) + "]"


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):
        return False


def run_chat(args: argparse.Namespace) -> int:
    """``ssd chat``: returns the exit code."""
    sampling, config = check_decode_args(args)
    check_model_args(args, need_draft=args.mode != "ar")
    interactive = _is_tty(sys.stdin)
    target, draft = load_models(args, need_draft=args.mode != "ar", slots=1)
    try:
        check_stops(target, sampling)
        session = ChatSession(target, system=args.system)
        budget(args, target, 0)  # -n -1 needs a context size: say so now, not per turn
        if interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
        with Engine(target, draft, mode=args.mode, config=config, driver=args.driver) as engine:
            note(f"chatting with {getattr(target, 'name', '?')} ({args.mode}). {COMMANDS_HELP}")
            seed = args.seed
            while True:
                try:
                    try:
                        line = input("> " if interactive else "")
                    except EOFError:
                        if interactive:
                            write_stdout("\n")
                        return 0
                    command = line.strip()
                    if not command:
                        continue
                    if command in ("/exit", "/quit"):
                        return 0
                    if command == "/reset":
                        session.reset()
                        note("history cleared")
                        continue
                    if command == "/help":
                        note(COMMANDS_HELP)
                        continue
                    if command.startswith("/") and not command.startswith("//"):
                        note(f"unknown command {command.split()[0]}; /help lists them")
                        continue
                    text = command[1:] if command.startswith("//") else line
                    try:
                        prompt = session.prompt_for(text)
                        n = budget(args, target, len(prompt))
                        renderer = Renderer(
                            target.tokenizer, special=args.special, stops=sampling.stop
                        )
                        reply = run_reply(
                            engine, prompt, sampling=sampling, max_new_tokens=n, seed=seed,
                            renderer=renderer, write=write_stdout,
                        )  # fmt: skip
                    except (ConfigError, InputError) as exc:
                        # e.g. the history outgrew the context: the session goes on
                        hint = " (/reset clears the history)" if "context" in str(exc) else ""
                        note(f"error: {describe(exc)}{hint}")
                        continue
                    write_stdout("\n")
                    if reply.terminated:
                        raise Terminated()
                    if reply.error is not None:
                        note(describe(reply.error))
                        return 1
                    session.commit(text, prompt, reply)
                    seed = (seed + 1) % (1 << 64)
                    print(_stats(reply), file=sys.stderr, flush=True)
                    r = reply.result
                    if r is not None and r.finish_reason == "length" and len(r.tokens) < n:
                        note("the conversation filled the context; /reset clears the history")
                except Terminated:
                    raise
                except KeyboardInterrupt:  # at the prompt, or between turns
                    write_stdout("\n")
                    note("Ctrl-D or /exit leaves")
    finally:
        free_models(target, draft)
