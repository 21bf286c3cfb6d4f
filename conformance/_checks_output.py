"""Checks on what a model *is* and what its logits look like.

Each check takes a :class:`~conformance._probe.Probe` around a fresh model and the run's
:class:`~conformance._settings.Settings`, returns the measured figure as text, and
raises :class:`Fault` (contract broken) or :class:`Skip` (does not apply).
"""

from __future__ import annotations

import numbers

from ssd_core import CapacityError, InputError

from ._probe import Fault, Probe, Skip
from ._settings import Settings

__all__ = [
    "check_attributes",
    "check_capacity",
    "check_empty_open",
    "check_finite",
    "check_invalid_tokens",
    "check_shapes",
    "seq_len",
]


def seq_len(p: Probe, s: Settings) -> int:
    """The sequence length to use: ``s.length``, capped so a handle can take 4 more tokens."""
    room = p.model.context_size
    if room is None:
        return s.length
    return max(1, min(s.length, int(room) - 4))


def check_attributes(p: Probe, s: Settings) -> str:
    """``name``, ``vocab_size``, ``context_size`` and ``tokenizer`` have sane values."""
    m = p.model
    name = getattr(m, "name", None)
    if not isinstance(name, str) or not name:
        raise Fault(f"model.name must be a non-empty str, got {name!r}")
    vocab = getattr(m, "vocab_size", None)
    if isinstance(vocab, bool) or not isinstance(vocab, numbers.Integral) or vocab < 1:
        raise Fault(f"model.vocab_size must be an int >= 1, got {vocab!r}")
    ctx = getattr(m, "context_size", "missing")
    if ctx is not None and (
        isinstance(ctx, bool) or not isinstance(ctx, numbers.Integral) or ctx < 1
    ):
        raise Fault(f"model.context_size must be None (unbounded) or an int >= 1, got {ctx!r}")
    if not hasattr(m, "tokenizer"):
        raise Fault("model.tokenizer is missing; set it to None for an id-only model")
    tok = m.tokenizer
    if tok is not None:
        for attr in ("encode", "decode", "eos_token_ids"):
            if not hasattr(tok, attr):
                raise Fault(f"model.tokenizer lacks {attr!r} (see ssd_core.Tokenizer)")
        eos = tuple(tok.eos_token_ids)
        if any(not 0 <= int(e) < int(vocab) for e in eos):
            raise Fault(f"tokenizer.eos_token_ids {eos} lie outside [0, {vocab})")
    for method in ("open", "extend", "fork", "truncate", "close"):
        if not callable(getattr(m, method, None)):
            raise Fault(f"model.{method} is missing or not callable")
    return f"vocab {vocab}, context {ctx}"


def check_shapes(p: Probe, s: Settings) -> str:
    """Logits are 2-D, one row per appended token, ``vocab_size`` columns, real floats."""
    cap = p.model.context_size or 1 << 30

    def n(k: int, held: int = 0) -> int:  # k tokens, or fewer if the context is tiny
        return max(1, min(k, cap - held))

    a = p.open(p.tokens(n(1, 1)), "open(1 token)")
    p.extend_one(a, p.tokens(1), "extend of 1 token")
    b = p.open([], "open([])")
    p.extend_one(b, p.tokens(n(4)), f"extend of {n(4)} tokens")
    reqs = [
        (p.open([], "open([])"), p.tokens(n(2))),
        (p.open(p.tokens(1), "open(1 token)"), p.tokens(n(3, 1))),
        (p.open([], "open([])"), p.tokens(1)),
    ]
    sizes = "+".join(str(len(t)) for _, t in reqs)
    p.extend(reqs, f"batch of 3 requests ({sizes} tokens)")
    info = p.dtype
    return f"dtype {info.name if info else '?'}"


def check_empty_open(p: Probe, s: Settings) -> str:
    """``open([])`` works, gives distinct handles, and scores like any other handle."""
    a = p.open([], "first open([])")
    b = p.open([], "second open([])")
    if a == b:
        raise Fault(f"two open([]) calls returned equal handles {a!r}; handles must be distinct")
    toks = p.tokens(3)
    rows = p.extend_one(a, toks, "extend of an empty handle")
    again = p.extend_one(b, toks, "same extend on a second empty handle")
    p.compare(
        again,
        rows,
        "second empty handle",
        context_len=0,
        against="the first empty handle given the same tokens",
    )
    full = p.open(p.tokens(4), "open(4 tokens)")
    empty = p.fork(full, 0, "fork(handle, 0)")
    p.compare(
        p.extend_one(empty, toks, "extend of fork(handle, 0)"),
        rows,
        "fork(handle, 0) then extend",
        context_len=0,
        against="an open([]) handle given the same tokens",
    )
    return f"max|diff| {p.max_diff:.3g}"


def check_finite(p: Probe, s: Settings) -> str:
    """No NaN or ``+inf`` in many rows of many contexts (``-inf`` is allowed)."""
    n_seq = 8 if s.quick else 24
    length = seq_len(p, s)
    rows = 0
    handles = [p.open(p.tokens(int(p.rng.integers(0, length))), "open") for _ in range(n_seq)]
    for _ in range(2):
        reqs = [(h, p.tokens(2)) for h in handles]
        p.extend(reqs, f"batch of {n_seq} requests")
        rows += 2 * n_seq
    return f"{rows} rows clean"


def check_invalid_tokens(p: Probe, s: Settings) -> str:
    """Token ids outside ``[0, vocab_size)`` raise InputError and change nothing."""
    v = p.vocab
    p.expect_raise(InputError, lambda: p.model.open([v]), f"open([{v}]) (id == vocab_size)")
    p.expect_raise(InputError, lambda: p.model.open([0, -1]), "open([0, -1])")
    prompt = p.tokens(3)
    h = p.open(prompt, "open(3 tokens)")
    p.expect_raise(InputError, lambda: p.model.extend([(h, [v])]), f"extend with token {v}")
    p.expect_raise(
        InputError, lambda: p.model.extend([(h, [0, v + 5])]), f"extend with tokens [0, {v + 5}]"
    )
    other = p.open(p.tokens(2), "open(2 tokens)")
    p.expect_raise(
        InputError,
        lambda: p.model.extend([(other, [1]), (h, [-3])]),
        "batch whose second request holds token -3",
    )
    p.expect_rows(
        h,
        p.tokens(2),
        prompt,
        "extend after the rejected extends (a rejected extend must leave the handle unchanged)",
        explain=[("a handle that kept the valid token 0 of the rejected extend", prompt + [0])],
    )
    return "InputError raised"


def check_capacity(p: Probe, s: Settings) -> str:
    """At ``context_size`` a handle refuses more tokens with CapacityError, never garbage.

    Every handle this check compares against holds at most ``context_size`` tokens, so
    a CapacityError always comes from the handle under test and is reported as what it
    means: a context the model declares but cannot hold, or a refused extend that left
    tokens behind.
    """
    room = p.model.context_size
    if room is None:
        raise Skip("context_size is None (unbounded)")
    room = int(room)
    if room > s.context_limit:
        mode = "--quick" if s.quick else "--full"
        raise Skip(
            f"context_size {room} > {s.context_limit}, the most this check fills in {mode}; "
            f"run --full, pass Settings(max_context=...), or load the model with a smaller "
            f"context"
        )
    if room < 2:
        raise Skip(f"context_size {room} < 2 leaves no room for a crossing extend")
    prompt = p.tokens(room - 1)
    h = p.open(prompt, f"open({room - 1} tokens), one below context_size")
    last = p.tokens(1)
    _fill(p, h, last, prompt, f"extend to exactly context_size={room}", refused=False)
    full = prompt + last
    p.expect_raise(
        CapacityError,
        lambda: p.model.extend([(h, p.tokens(1))]),
        f"extend past context_size={room}",
    )
    p.expect_raise(
        CapacityError,
        lambda: p.model.open(p.tokens(room + 1)),
        f"open({room + 1} tokens) past context_size",
    )
    g = p.fork(h, room - 2, f"fork(full handle, {room - 2})")
    crossing = p.tokens(3)
    p.expect_raise(
        CapacityError,
        lambda: p.model.extend([(g, crossing)]),
        f"extend of 3 tokens from {room - 2} (crosses context_size)",
    )
    _fill(
        p,
        g,
        p.tokens(2),
        full[: room - 2],
        f"extend of 2 tokens into the {room - 2}-token fork after its refused 3-token extend",
        refused=True,
        explain=[
            (
                "a handle that kept the first token of the refused extend",
                full[: room - 2] + crossing[:1],
            )
        ],
    )
    p.truncate(h, room - 1, f"truncate(full handle, {room - 1})")
    _fill(
        p,
        h,
        last,
        prompt,
        "extend after the refused extend and a truncate",
        refused=True,
    )
    return f"context {room}"


def _fill(
    p: Probe,
    handle: object,
    tokens: list[int],
    before: list[int],
    what: str,
    *,
    refused: bool,
    explain: list[tuple[str, list[int]]] | None = None,
) -> None:
    """Extend ``handle`` (holding ``before``) up to at most ``context_size`` and compare
    with fresh handles; a CapacityError from the handle says what it means."""
    try:
        p.expect_rows(handle, tokens, before, what, explain=explain or ())
    except CapacityError as exc:
        n = len(before) + len(tokens)
        cause = (
            "the refused extend left tokens behind (a call that raises must leave the "
            "handle unchanged)"
            if refused
            else "the model cannot hold the context_size it declares"
        )
        raise Fault(
            f"{what}: raised CapacityError ({exc}) for a handle that should hold "
            f"{len(before)} tokens, though {len(before)} + {len(tokens)} = {n} <= "
            f"context_size={p.room}: {cause}"
        ) from exc
