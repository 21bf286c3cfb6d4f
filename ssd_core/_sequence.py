"""Per-sequence state and the values that flow between the machine and its jobs.

The :class:`~ssd_core.Machine` owns every :class:`Sequence` and is the only code that
writes one. Jobs read frozen inputs built from it and return frozen results (see
:mod:`ssd_core._jobs`); the machine applies them. The stage of a sequence changes only
through :data:`SEQUENCE_TRANSITIONS`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ._config import SamplingParams
from ._fanout import OutcomeStats
from ._metrics import Counters
from ._policy import Calibration
from ._protocol import Handle
from ._random import Stream

__all__ = [
    "SEQUENCE_TRANSITIONS",
    "DraftHandle",
    "Outcome",
    "Seq",
    "SeqEvent",
    "Speculation",
    "Stage",
    "TargetHandle",
    "FAST_CONFIDENCE",
    "fast_backup",
    "fast_backup_tokens",
]


class Stage(enum.Enum):
    """Where one sequence is in its life."""

    OPENING = "opening"  # prefilling its prompt on the lanes
    DRAFTING = "drafting"  # the draft proposes its next speculation just in time
    READY = "ready"  # it has a speculation and waits for the next round
    VERIFYING = "verifying"  # a member of the round in flight
    FINISHED = "finished"  # stopped, out of budget or cancelled; handles being closed
    CLOSED = "closed"  # every handle released: it has left the machine


class SeqEvent(enum.Enum):
    NEED_DRAFT = "need_draft"  # no speculation yet: draft one just in time
    SPECULATED = "speculated"  # it has its next speculation (drafted, cached, fast or empty)
    ROUND = "round"  # the next round takes it in
    FINISH = "finish"  # a stop, the budget, the context, or a cancel
    RELEASED = "released"  # its last handle was closed


#: (stage, event) -> next stage. Every stage change of a sequence goes through here.
SEQUENCE_TRANSITIONS: dict[tuple[Stage, SeqEvent], Stage] = {
    (Stage.OPENING, SeqEvent.NEED_DRAFT): Stage.DRAFTING,
    (Stage.OPENING, SeqEvent.SPECULATED): Stage.READY,
    (Stage.DRAFTING, SeqEvent.SPECULATED): Stage.READY,
    (Stage.READY, SeqEvent.ROUND): Stage.VERIFYING,
    (Stage.VERIFYING, SeqEvent.SPECULATED): Stage.READY,
    (Stage.VERIFYING, SeqEvent.NEED_DRAFT): Stage.DRAFTING,
    (Stage.OPENING, SeqEvent.FINISH): Stage.FINISHED,
    (Stage.DRAFTING, SeqEvent.FINISH): Stage.FINISHED,
    (Stage.READY, SeqEvent.FINISH): Stage.FINISHED,
    (Stage.VERIFYING, SeqEvent.FINISH): Stage.FINISHED,
    (Stage.FINISHED, SeqEvent.RELEASED): Stage.CLOSED,
}


@attrs.frozen
class Speculation:
    """Draft tokens and the proposal weights (rows, any namespace) they were drawn from.

    ``source`` is ``"cache"`` (a hit: the primary speculator), ``"neural"`` (drafted
    just in time), ``"fast"`` (n-gram backup tokens: point masses, ``q`` is ``None``
    and the verifier uses one-hot rows) or ``"none"`` (no speculation: a plain target
    step).
    """

    tokens: tuple[int, ...]
    q: Any
    source: str
    #: The draft's confidence at each position (see :mod:`ssd_core._policy`), when known.
    conf: tuple[float, ...] = ()

    def truncated(self, n: int) -> Speculation:
        """The first ``n`` tokens with their rows. Lossless only when ``n`` was chosen
        without looking at the tokens themselves (from the rows: see ``_policy``)."""
        if n >= len(self.tokens):
            return self
        if n <= 0:
            return NO_SPECULATION
        return Speculation(
            tokens=self.tokens[:n],
            q=None if self.q is None else self.q[:n],
            source=self.source,
            conf=self.conf[:n],
        )


NO_SPECULATION = Speculation(tokens=(), q=None, source="none")


@attrs.frozen
class Outcome:
    """One sequence's verification: ``accepted`` of ``proposed`` draft tokens, then
    ``token`` (the recovery token after a rejection, else the bonus token)."""

    accepted: int
    token: int
    proposed: int

    @property
    def rejected(self) -> bool:
        return self.accepted < self.proposed


@attrs.frozen
class TargetHandle:
    """A target handle and the tokens it holds."""

    handle: Handle
    held: tuple[int, ...]

    def sync(self, desired: Sequence[int], first_needed: int) -> tuple[int | None, tuple[int, ...]]:
        """How to bring the handle to ``desired`` while scoring every position from
        ``first_needed`` on: (truncate-to or None, tokens to feed)."""
        keep = min(_common_prefix(self.held, desired), first_needed)
        return (keep if keep < len(self.held) else None), tuple(desired[keep:])


@attrs.frozen
class DraftHandle:
    """A draft handle, the tokens it holds, and the raw draft rows already computed
    for it, by the position of the token that was fed (row p predicts token p + 1)."""

    handle: Handle
    held: tuple[int, ...]
    rows: Mapping[int, Any] = attrs.field(factory=dict)

    def plan(
        self, desired: Sequence[int], first_needed: int
    ) -> tuple[int | None, tuple[int, ...], int, dict[int, Any]]:
        """Bring the handle to ``desired`` so that rows from ``first_needed`` on are
        known, reusing remembered rows: (truncate-to or None, tokens to feed, first fed
        position, the remembered rows still valid)."""
        keep = min(_common_prefix(self.held, desired), len(desired) - 1)
        if any(p not in self.rows for p in range(first_needed, keep)):
            keep = min(keep, first_needed)
        truncate = keep if keep < len(self.held) else None
        kept = {p: r for p, r in self.rows.items() if first_needed <= p < keep}
        return truncate, tuple(desired[keep:]), keep, kept


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@attrs.define(eq=False)
class Seq:
    """One sequence, as the machine sees it. Written only by the machine."""

    sid: int
    stream: Stream
    prompt_len: int
    tokens: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    max_new: int
    #: Whether this sequence uses the draft lane (False in AR mode, for a prompt the
    #: draft's context cannot hold, and after the draft lane was lost).
    speculates: bool
    stats: dict[str, OutcomeStats]
    calib: Calibration = attrs.field(factory=Calibration)
    #: The same for fast (n-gram backup) speculations, whose confidence stands in for
    #: the length of the n-gram they copied.
    calib_fast: Calibration = attrs.field(factory=Calibration)
    stage: Stage = Stage.OPENING
    finish_reason: str | None = None
    spec: Speculation | None = None
    target: TargetHandle | None = None
    draft: DraftHandle | None = None
    #: Verification rounds this sequence has been through (names its draws).
    rounds: int = 0
    counters: Counters = attrs.field(factory=Counters)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def remaining(self) -> int:
        """Tokens it may still commit before its budget is spent."""
        return self.max_new - (len(self.tokens) - self.prompt_len)

    @property
    def live(self) -> bool:
        return self.stage not in (Stage.FINISHED, Stage.CLOSED)


def fast_backup_tokens(context: Sequence[int], k: int, max_n: int = 3) -> tuple[int, ...]:
    """Cheap backup tokens: prompt lookup of the longest recent n-gram, else repetition.

    A deterministic function of the context, so it is a point-mass proposal.
    """
    return fast_backup(context, k, max_n)[0]


#: A fast speculation's stand-in for the draft's confidence, by the length of the
#: n-gram it copied (0: no match, the last token repeated); the speculation-length
#: policy calibrates it per sequence like a draft's confidence.
FAST_CONFIDENCE = (0.01, 0.5, 0.9, 0.99)


def fast_backup(context: Sequence[int], k: int, max_n: int = 3) -> tuple[tuple[int, ...], int]:
    """:func:`fast_backup_tokens` and the length of the n-gram it matched (0: none)."""
    ctx = list(context)
    for n in range(min(max_n, len(ctx) - 1), 0, -1):
        tail = ctx[-n:]
        for start in range(len(ctx) - n - 1, -1, -1):
            if ctx[start : start + n] == tail:
                follow = ctx[start + n : start + n + k]
                return tuple(follow + [follow[-1]] * (k - len(follow))), n
    return (ctx[-1],) * k, 0
