"""What the ``ssd`` commands read from and write to the terminal: the prompt (an
argument, ``-p``, ``-f FILE`` or stdin), its token ids (through the chat template
where asked), generated tokens rendered as text the same way on every backend, one
request streamed to stdout with Ctrl-C handled, progress and status lines on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import attrs

from ssd_core import (
    ConfigError,
    Engine,
    GenerationError,
    InputError,
    Model,
    RequestResult,
    SamplingParams,
)

__all__ = [
    "Progress",
    "Renderer",
    "Reply",
    "Terminated",
    "check_stops",
    "describe",
    "encode_messages",
    "encode_prompt",
    "note",
    "read_prompt",
    "run_reply",
    "write_stdout",
]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread (by ``ssd``'s handler) so that models and
    threads are released; a reply in progress ends as on Ctrl-C."""


def _name(model: object) -> str:
    return repr(getattr(model, "name", "?"))


class Progress:
    """A "doing X ... 3 s" line on stderr while a slow step runs.

    On a terminal the line ticks every second once the step has taken ``delay``
    seconds; elsewhere one line is written at the end, only if the step took longer
    than ``delay``. Nothing at all when ``enabled`` is false (``--json``).
    """

    def __init__(
        self,
        message: str,
        *,
        enabled: bool = True,
        stream: IO[str] | None = None,
        delay: float = 0.5,
    ) -> None:
        self.message = message
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.delay = delay
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drawn = False
        self._t0 = 0.0

    def _tty(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def _tick(self) -> None:
        if self._stop.wait(self.delay):
            return
        while True:
            elapsed = time.monotonic() - self._t0
            self.stream.write(f"\rssd: {self.message} ... {elapsed:.0f} s")
            self.stream.flush()
            self._drawn = True
            if self._stop.wait(1.0):
                return

    def __enter__(self) -> Progress:
        self._t0 = time.monotonic()
        if self.enabled and self._tty():
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.enabled:
            return
        elapsed = time.monotonic() - self._t0
        if self._drawn or elapsed >= self.delay:
            state = "done" if exc_type is None else "stopped"
            end = f"ssd: {self.message} ... {state} in {elapsed:.1f} s"
            with contextlib.suppress(BrokenPipeError, ValueError):  # stderr closed
                self.stream.write(("\r" + end + "\x1b[K\n") if self._drawn else end + "\n")
                self.stream.flush()


# -- prompts -------------------------------------------------------------------------


def _text_of(data: bytes, where: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"the prompt from {where} is not UTF-8 text (byte 0x{data[exc.start]:02x} at "
            f"offset {exc.start}); convert it first, e.g. with iconv -t UTF-8"
        ) from None
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def _read_stdin(stdin: Any) -> str:
    if stdin is None:
        raise InputError("no prompt: give one as an argument, with -p TEXT or -f FILE")
    try:
        buf = getattr(stdin, "buffer", None)
        data = buf.read() if buf is not None else stdin.read().encode("utf-8", "surrogateescape")
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the prompt from stdin: {exc}") from None
    if not data.strip():
        raise InputError("no prompt: stdin is empty (give one as an argument, -p TEXT or -f FILE)")
    return _text_of(data, "stdin")


def _is_tty(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed
        return False


def read_prompt(args: argparse.Namespace, stdin: Any = None) -> str:
    """The prompt text from the positional argument, ``-p``, ``-f FILE`` or stdin
    (``-`` for either, or a pipe when none is given).

    Raises:
        ConfigError: more than one source.
        InputError: no prompt at all on a terminal, an empty pipe, an unreadable or
            non-UTF-8 file.
    """
    stdin = sys.stdin if stdin is None else stdin
    given = [
        (name, value)
        for name, value in (
            ("the prompt argument", args.prompt),
            ("-p", args.prompt_opt),
            ("-f", args.prompt_file),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise ConfigError(
            f"give the prompt once: {' and '.join(name for name, _ in given)} were both given"
        )
    if given:
        name, value = given[0]
        if name == "-f":
            if value == "-":
                text = _read_stdin(stdin)
            else:
                path = Path(value)
                try:
                    data = path.read_bytes()
                except OSError as exc:
                    raise InputError(
                        f"cannot read the prompt file {value!r}: {exc.strerror}"
                    ) from None
                text = _text_of(data, repr(value))
        elif value == "-" and name == "the prompt argument":
            text = _read_stdin(stdin)
        else:
            text = value
            if any("\udc80" <= c <= "\udcff" for c in text):
                raise InputError(f"the prompt given with {name} is not UTF-8 text")
    elif _is_tty(stdin) or stdin is None:
        raise InputError(
            "no prompt: give one as an argument, with -p TEXT, -f FILE, or on stdin "
            "(echo TEXT | ssd generate)"
        )
    else:
        text = _read_stdin(stdin)
    if not text.strip():
        raise InputError("the prompt is empty")
    return text


def _ids(text: str, target: Model) -> list[int]:
    raw = text.replace(",", " ").split()
    try:
        return [int(x) for x in raw]
    except ValueError:
        raise InputError(
            f"model {_name(target)} has no tokenizer: give the prompt as token ids (e.g. '1 2 3')"
        ) from None


def check_stops(target: Model, sampling: SamplingParams) -> None:
    """``--stop`` needs text: refuse it on an id-only model before generating.

    Raises:
        ConfigError: stop strings for a model without a tokenizer.
    """
    if sampling.stop and getattr(target, "tokenizer", None) is None:
        raise ConfigError(
            f"--stop needs a model with a tokenizer; {_name(target)} works on token ids only"
        )


def encode_messages(target: Model, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of chat ``messages`` through the target's chat template
    (``target.apply_chat_template(messages) -> ids``).

    Raises:
        ConfigError: the target has no chat template.
    """
    template = getattr(target, "apply_chat_template", None)
    if template is None:
        raise ConfigError(
            f"model {_name(target)} has no chat template (drop --chat/--system, "
            "or use a model that has one)"
        )
    return [int(t) for t in template(list(messages))]


def encode_prompt(
    target: Model, text: str, *, chat: bool = False, system: str | None = None
) -> list[int]:
    """Token ids for ``text``: through the tokenizer (and the chat template with
    ``chat`` or a ``system`` message), or parsed ids for id-only models.

    Raises:
        InputError: text for an id-only model.
        ConfigError: ``chat`` on a model without a chat template.
    """
    tok = getattr(target, "tokenizer", None)
    if chat or system is not None:
        messages = [] if system is None else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": text})
        return encode_messages(target, messages)
    if tok is None:
        return _ids(text, target)
    return list(tok.encode(text))


# -- output --------------------------------------------------------------------------


class Renderer:
    """Generated tokens as text, the same on every backend.

    End-of-text tokens (the tokenizer's ``eos_token_ids``) are hidden unless
    ``special``: torch's tokenizer would print ``<|im_end|>`` where llama.cpp's drops
    it. With ``special`` they are rendered (llama.cpp's ``render_special``). Text that
    a later token could still change is held back: an incomplete UTF-8 character, and
    while stop strings are set, a tail that could begin one; text from a stop string
    on is never shown. Id-only models render ids separated by spaces.

    Args:
        tokenizer: the target's tokenizer, or ``None``.
        special: show end-of-text tokens.
        stops: the request's text stop strings.
    """

    def __init__(self, tokenizer: Any, *, special: bool = False, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.special = special
        self.stops = tuple(stops)
        eos = getattr(tokenizer, "eos_token_ids", ()) or ()
        self._hidden = frozenset() if special else frozenset(int(t) for t in eos)
        self._render_kw = special and _accepts(getattr(tokenizer, "decode", None), "render_special")
        self.tokens: list[int] = []
        self.text = ""
        self._shown = 0

    def _decode(self, tokens: Sequence[int]) -> str:
        ids = [t for t in tokens if t not in self._hidden]
        if self.tokenizer is None:
            return " ".join(str(t) for t in ids)
        if self._render_kw:
            return str(self.tokenizer.decode(ids, render_special=True))
        return str(self.tokenizer.decode(ids))

    def _cut(self, text: str) -> int:
        hits = [at for at in (text.find(s) for s in self.stops) if at >= 0]
        return min(hits) if hits else len(text)

    def _open_prefix(self, text: str) -> int:
        """How many trailing characters could still begin a stop string."""
        return max(
            (k for s in self.stops for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])),
            default=0,
        )

    def add(self, tokens: Sequence[int]) -> str:
        """Take newly committed tokens; returns the text that is now certain."""
        self.tokens.extend(int(t) for t in tokens)
        self.text = self._decode(self.tokens)
        if self.tokenizer is None:
            return self._flush(len(self.text))
        stable = len(self.text.rstrip("\ufffd"))
        if self.stops:
            cut = self._cut(self.text)
            stable = min(stable, cut, len(self.text) - self._open_prefix(self.text))
        return self._flush(stable)

    def finish(self) -> str:
        """The rest of the text once the request has ended (cut before a stop string)."""
        self.text = self.text[: self._cut(self.text)]
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        if upto <= self._shown:
            return ""
        out = self.text[self._shown : upto]
        self._shown = upto
        return out


def _accepts(fn: Callable[..., Any] | None, name: str) -> bool:
    if fn is None:
        return False
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def describe(exc: BaseException) -> str:
    """One line for an error: its message, or its type when it has none."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# -- one request ---------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Reply:
    """How one request the command line ran ended.

    Attributes:
        result: the engine's :class:`RequestResult` (``partial`` of the error, if any).
        text: the rendered text (:class:`Renderer`), or ``None`` for id-only models.
        interrupted: Ctrl-C (or SIGTERM) stopped it (``result.finish_reason ==
            "cancelled"``).
        terminated: it was SIGTERM.
        error: the :class:`GenerationError` that ended it, if one did.
    """

    result: RequestResult | None
    text: str | None
    interrupted: bool = False
    terminated: bool = False
    error: GenerationError | None = None

    @property
    def tokens(self) -> list[int]:
        return list(self.result.tokens) if self.result is not None else []


def run_reply(
    engine: Engine,
    prompt: Sequence[int],
    *,
    sampling: SamplingParams,
    max_new_tokens: int,
    seed: int | None,
    renderer: Renderer,
    write: Callable[[str], object] | None = None,
) -> Reply:
    """Submit one request and stream its text to ``write`` as rounds commit tokens.

    Ctrl-C cancels the request (it keeps what it had committed) and returns normally
    with ``interrupted``; a second Ctrl-C while waiting for the cancel propagates. A
    failed run returns with ``error`` set and the partial result. Anything ``write``
    raises (a closed pipe) cancels the request and propagates.

    Raises:
        InputError, ConfigError: bad prompt or parameters (nothing was submitted).
    """
    handle = engine.submit(prompt, sampling=sampling, max_new_tokens=max_new_tokens, seed=seed)
    interrupted = terminated = False
    error: GenerationError | None = None
    result: RequestResult | None = None
    try:
        try:
            for ev in handle:
                piece = renderer.add(ev.tokens)
                if piece and write is not None:
                    write(piece)
        except KeyboardInterrupt as exc:
            interrupted, terminated = True, isinstance(exc, Terminated)
            handle.cancel()
        result = handle.result()
    except GenerationError as exc:
        error = exc
        partial = exc.partial
        result = partial if isinstance(partial, RequestResult) else None
    except BaseException:
        handle.cancel()
        raise
    done = list(result.tokens) if result is not None else list(handle.tokens)
    rest = renderer.add(done[len(renderer.tokens) :]) + renderer.finish()
    if rest and write is not None:
        write(rest)
    text = renderer.text if renderer.tokenizer is not None else None
    return Reply(
        result=result, text=text, interrupted=interrupted, terminated=terminated, error=error
    )


def write_stdout(text: str) -> None:
    """Write and flush (a closed pipe raises :class:`BrokenPipeError` to the caller)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def note(text: str) -> None:
    """One ``ssd: ...`` line on stderr (a closed stderr is ignored)."""
    with contextlib.suppress(BrokenPipeError, ValueError):
        print(f"ssd: {text}", file=sys.stderr, flush=True)
