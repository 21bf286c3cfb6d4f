"""GGUF chat templates: rendered with time and size limits, tokenised so that user text
never becomes control tokens.

A chat template is Jinja code taken from the model file. It runs in jinja2's immutable
sandbox (no attribute tricks, no mutation of lists and dicts), and on top of it:

* **a deadline**: a trace function on the rendering thread checks the clock on every
  Python line (template code and the jinja runtime it calls), so nested loops stop
  after ``timeout_s`` instead of running for ever;
* **size guards**: ``*``, ``**``, ``+``, ``%`` and ``~`` are intercepted and refused
  before they would build a string, list or int beyond ``max_chars``; so are integer
  arguments beyond ``max_chars`` to the str methods and filters that widen their
  result by them (``center(10**10)``, ``indent``, ``tojson(indent=...)``), format
  widths beyond it, and ``replace`` calls whose result would exceed it; the output is
  consumed in chunks and stops at ``max_chars``.

Everything that goes wrong is a :class:`ChatTemplateError` (a ``ConfigError``).
The guards stop the classic bombs (nested ``range`` loops, ``'x' * 10**10``, doubling
loops); a template is still code from the model file, so load GGUFs you trust.

Tokenising: :func:`split_rendered` renders the messages a second time with each
``content`` wrapped in unique markers, which splits the prompt into template text and
user text. Template text is partitioned at special-token texts the way llama.cpp does
with ``parse_special``; user text never is.
"""

from __future__ import annotations

import functools
import re
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ssd_core import ConfigError

__all__ = ["ChatTemplateError", "TemplateRenderer", "split_rendered"]

#: Default limits: rendering time (seconds) and rendered characters.
DEFAULT_TIMEOUT_S = 2.0
DEFAULT_MAX_CHARS = 4_000_000


class ChatTemplateError(ConfigError):
    """A chat template failed, ran past its time limit, or would produce too much text."""


#: The largest integer (in bits) a template may build; chat templates count messages.
_MAX_INT_BITS = 4096
#: str methods and filters whose integer arguments set the size of their result.
_WIDENING_STR_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
_WIDENING_FILTERS = frozenset({"center", "indent", "tojson"})


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\d*)(?:\.(\d*))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)\}")
_NESTED_FIELD = re.compile(r"\{[^{}]*\{")


def _too_big(digits: str, limit: int) -> bool:
    return bool(digits) and (len(digits) > 9 or int(digits) > limit)


def _percent_too_wide(fmt: str, limit: int) -> bool:
    """A ``%`` conversion in ``fmt`` with a width or precision beyond ``limit``."""
    return any(_too_big(d, limit) for m in _PERCENT_SPEC.finditer(fmt) for d in m.groups("") if d)


def _braces_too_wide(fmt: str, limit: int) -> bool:
    """A ``{...:spec}`` field in ``fmt`` whose spec holds a number beyond ``limit``."""
    return any(
        _too_big(d, limit) for spec in _BRACE_SPEC.findall(fmt) for d in re.findall(r"\d+", spec)
    )


def _size(value: Any) -> int | None:
    if isinstance(value, (str, bytes, list, tuple)):
        return len(value)
    return None


def _make_env(owner: str, max_chars: int) -> Any:
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def refuse(what: str) -> ChatTemplateError:
        return ChatTemplateError(
            f"{owner}: chat template refused: {what} (limit {max_chars:,} characters)"
        )

    def check_ints(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > max_chars:
                raise refuse(f"an argument of {value:.3g}")

    def check_replace(s: Any, old: Any, new: Any) -> None:
        if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
            count = len(s) + 1 if not old else s.count(old)
            if len(s) + count * max(0, len(new) - len(old)) > max_chars:
                raise refuse("a replace() whose result is too long")

    class Generator(CodeGenerator):
        # ``a ~ b`` compiles to a plain join; route it through the size check.
        def visit_Concat(self, node: Any, frame: Any) -> None:
            self.write("environment.guarded_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Env(ImmutableSandboxedEnvironment):
        code_generator_class = Generator
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    size = _size(seq)
                    if size is not None and isinstance(n, int) and size * n > max_chars:
                        raise refuse(f"a repetition to {size * n:.3g} items")
                both_int = isinstance(left, int) and isinstance(right, int)
                if both_int and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                    raise refuse("an integer product that large")
            elif operator == "**":
                both_int = isinstance(left, int) and isinstance(right, int)
                if (
                    both_int
                    and right > 0
                    and right * max(1, abs(left).bit_length()) > _MAX_INT_BITS
                ):
                    raise refuse("an integer power that large")
            elif operator == "+":
                a, b = _size(left), _size(right)
                if a is not None and b is not None and a + b > max_chars:
                    raise refuse("a concatenation that long")
            elif operator == "%" and isinstance(left, str):
                if _percent_too_wide(left, max_chars):
                    raise refuse("a %-format width that large")
                if "*" in left:  # widths taken from the arguments
                    check_ints(right if isinstance(right, tuple) else (right,), {})
            return super().call_binop(context, operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            target = getattr(__obj, "__wrapped__", __obj)
            name = getattr(target, "__name__", "")
            if isinstance(getattr(target, "__self__", None), str):
                if name in _WIDENING_STR_METHODS:
                    check_ints(args, kwargs)
                elif name == "replace" and len(args) >= 2:
                    check_replace(target.__self__, args[0], args[1])
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value: Any) -> Any:
            # Called for every attribute a template reads; returns a wrapper only for
            # str.format / str.format_map, which is where widths are checked.
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None
            fmt = value.__self__
            if _braces_too_wide(fmt, max_chars):
                raise refuse("a format width that large")
            if not _NESTED_FIELD.search(fmt):
                return wrapped

            def nested(*args: Any, **kwargs: Any) -> Any:  # widths from the arguments
                check_ints(args, kwargs)
                return wrapped(*args, **kwargs)

            return nested

        def guarded_concat(self, parts: Sequence[Any]) -> str:
            texts = [str(p) for p in parts]
            if sum(map(len, texts)) > max_chars:
                raise refuse("a ~ concatenation that long")
            return "".join(texts)

    def guard_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)  # keeps jinja's pass_context/pass_eval_context marks
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if name in _WIDENING_FILTERS:
                check_ints(args, kwargs)
            if name == "replace":
                plain = [a for a in args if not hasattr(a, "environment")]  # drop eval ctx
                if len(plain) >= 3:
                    check_replace(plain[0], plain[1], plain[2])
            if name == "format" and args and isinstance(args[0], str):
                if _percent_too_wide(args[0], max_chars):
                    raise refuse("a format width that large")
                if "*" in args[0]:  # widths taken from the arguments
                    check_ints(args[1:], kwargs)
            return fn(*args, **kwargs)

        return guarded

    env = Env(trim_blocks=True, lstrip_blocks=True)
    env.filters = {name: guard_filter(name, fn) for name, fn in env.filters.items()}
    env.globals.pop("lipsum", None)  # generates text in a Python loop; no template needs it
    return env


class TemplateRenderer:
    """Renders one chat template (compiled once) under the limits above."""

    def __init__(
        self,
        source: str,
        *,
        owner: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> None:
        self.source = source
        self.owner = owner
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        self._template: Any = None

    def render(self, **variables: Any) -> str:
        """Render with ``variables`` (``messages``, ``add_generation_prompt``, ...).

        Raises:
            ChatTemplateError: a template error, the deadline, or the size limit.
        """
        try:
            import jinja2  # noqa: F401
        except ImportError as exc:  # pragma: no cover - jinja2 ships with llama-cpp-python
            raise ConfigError("chat templates need jinja2 (pip install jinja2)") from exc
        deadline = time.monotonic() + self.timeout_s
        owner, timeout = self.owner, self.timeout_s

        def on_line(frame: Any, event: str, arg: Any) -> Any:
            if time.monotonic() > deadline:
                raise ChatTemplateError(
                    f"{owner}: chat template ran past its time limit of {timeout:g} s"
                )
            return on_line

        def on_call(frame: Any, event: str, arg: Any) -> Any:
            return on_line(frame, event, arg)

        previous = sys.gettrace()
        sys.settrace(on_call)
        try:
            if self._template is None:
                env = _make_env(self.owner, self.max_chars)
                self._template = env.from_string(self.source)
            chunks: list[str] = []
            total = 0
            for chunk in self._template.generate(**variables):
                total += len(chunk)
                if total > self.max_chars:
                    raise ChatTemplateError(
                        f"{self.owner}: chat template output exceeds {self.max_chars:,} characters"
                    )
                chunks.append(chunk)
            return "".join(chunks)
        except ChatTemplateError:
            raise
        except RecursionError:
            raise ChatTemplateError(f"{self.owner}: chat template recursed too deeply") from None
        except MemoryError:
            raise ChatTemplateError(f"{self.owner}: chat template ran out of memory") from None
        except Exception as exc:  # jinja2 errors, SecurityError, TypeError from the template
            raise ChatTemplateError(
                f"{self.owner}: chat template error: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            sys.settrace(previous)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def split_rendered(
    renderer: TemplateRenderer,
    messages: Sequence[Mapping[str, Any]],
    variables: Mapping[str, Any],
    *,
    special_texts: Sequence[str],
) -> list[tuple[str, bool]] | None:
    """The rendered prompt as ``(text, is_user_text)`` pieces, or ``None`` when the
    template does not simply paste each message's content (then the caller decides).

    Each string ``content`` is rendered wrapped in unique markers; the text between a
    pair of markers is user text, the rest is template text.

    Raises:
        ChatTemplateError: as :meth:`TemplateRenderer.render`, or a message field other
            than ``content`` (a role, a name) contains the text of a special token.
    """
    contents = [m.get("content") for m in messages]
    for m in messages:
        for key, value in m.items():
            if key == "content" and isinstance(value, str):
                continue
            for s in _strings(value):
                hit = next((t for t in special_texts if t in s), None)
                if hit is not None:
                    raise ChatTemplateError(
                        f"{renderer.owner}: message field {key!r} contains the special token "
                        f"text {hit!r}; only allow_special=True lets it through"
                    )
    texts = [c for c in contents if isinstance(c, str)]
    nonce = secrets.token_hex(8)
    while any(nonce in t for t in texts):  # pragma: no cover - 64 random bits
        nonce = secrets.token_hex(8)
    start = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
    end = [f"\ue002{nonce}:{i}\ue003" for i in range(len(messages))]
    wrapped = [
        {**m, "content": start[i] + m["content"] + end[i]}
        if isinstance(contents[i], str)
        else dict(m)
        for i, m in enumerate(messages)
    ]
    marked = renderer.render(**{**variables, "messages": wrapped})
    pattern = re.compile(f"\ue000{nonce}:(\\d+)\ue001(.*?)\ue002{nonce}:(\\d+)\ue003", re.S)
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for match in pattern.finditer(marked):
        if match.group(1) != match.group(3):
            return None
        pieces.append((marked[pos : match.start()], False))
        pieces.append((match.group(2), True))
        pos = match.end()
    pieces.append((marked[pos:], False))
    if any(nonce in text for text, _ in pieces):
        return None  # a marker was split, dropped or duplicated by the template
    return [(text, user) for text, user in pieces if text]
