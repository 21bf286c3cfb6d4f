"""Per-sequence state: the committed tokens, the speculation to verify next, and what
each backend handle holds (see the theory of operation in :mod:`ssd_core._machine`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from ._config import SamplingParams
from ._protocol import Handle

__all__ = ["Outcome", "Speculation", "fast_backup_tokens"]


@attrs.define
class Speculation:
    """Draft tokens and the proposal weights (rows, any namespace) they were drawn from.

    ``source`` is ``"cache"`` (a hit: the primary speculator), ``"neural"`` (drafted
    just in time) or ``"fast"`` (n-gram backup tokens: point masses, ``q`` is ``None``
    and the verifier uses one-hot rows).
    """

    tokens: tuple[int, ...]
    q: Any
    source: str


@attrs.define
class Outcome:
    accepted: int
    token: int
    proposed: int


@attrs.define(eq=False)
class _Seq:
    index: int
    prompt_len: int
    tokens: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    max_new: int
    done: bool = False
    finish_reason: str | None = None
    spec: Speculation | None = None
    t_handle: Handle = None
    t_held: list[int] = attrs.field(factory=list)
    d_handle: Handle = None
    d_held: list[int] = attrs.field(factory=list)
    #: Raw draft logits rows already computed for the draft handle, by the position of
    #: the token that was fed (row p predicts token p + 1).
    d_rows: dict[int, Any] = attrs.field(factory=dict)
    rounds: int = 0

    def plan_draft(
        self, desired: list[int], first_needed: int
    ) -> tuple[int | None, tuple[int, ...], int]:
        """Bring the draft handle to ``desired`` so that rows from ``first_needed`` on are
        known, reusing remembered rows: (truncate-to or None, tokens to feed, first fed
        position). The handle is recorded as holding ``desired`` from now on."""
        keep = min(_common_prefix(self.d_held, desired), len(desired) - 1)
        if any(p not in self.d_rows for p in range(first_needed, keep)):
            keep = min(keep, first_needed)
        truncate = keep if keep < len(self.d_held) else None
        self.d_rows = {p: r for p, r in self.d_rows.items() if first_needed <= p < keep}
        self.d_held = list(desired)
        return truncate, tuple(desired[keep:]), keep

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _sync(
    held: list[int], desired: list[int], first_needed: int
) -> tuple[int | None, tuple[int, ...]]:
    """How to bring a handle holding ``held`` to ``desired`` while scoring every
    position from ``first_needed`` on: (truncate-to or None, tokens to feed)."""
    keep = min(_common_prefix(held, desired), first_needed)
    return (keep if keep < len(held) else None), tuple(desired[keep:])


def fast_backup_tokens(context: Sequence[int], k: int, max_n: int = 3) -> tuple[int, ...]:
    """Cheap backup tokens: prompt lookup of the longest recent n-gram, else repetition.

    A deterministic function of the context, so it is a point-mass proposal.
    """
    ctx = list(context)
    for n in range(min(max_n, len(ctx) - 1), 0, -1):
        tail = ctx[-n:]
        for start in range(len(ctx) - n - 1, -1, -1):
            if ctx[start : start + n] == tail:
                follow = ctx[start + n : start + n + k]
                return tuple(follow + [follow[-1]] * (k - len(follow)))
    return (ctx[-1],) * k
