"""Speculate only when it pays: each round's speculation length, per sequence.

Saguaro's Theorem 7 prices a round: it yields ``E`` tokens in expectation and costs the
verification (a fixed part per target pass plus a part per verified row) plus whatever
drafting sits on the critical path. A speculation of length k whose positions are
accepted with probabilities a_1..a_k yields ``E(k) = 1 + sum_j prod_{l<=j} a_l`` tokens.
The machine proposes a position only while it raises the expected tokens per unit of
cost; with nothing worth proposing it takes a plain target step (k = 0).

Predicted acceptance comes from the draft's *confidence* at a position -- the largest
probability of its temperature-1 distribution there, a function of the context *before*
the token is drawn -- mapped through a per-sequence calibration table learned online
from that sequence's own verified positions. Deciding from the row, never from the
token drawn from it, is what keeps the rule lossless: whether position j is proposed
depends only on the tokens before it, and a token once drawn is always proposed (a
rule that dropped a drawn token because of its own value would bias the proposal). A
model-free draft abstains this way: with no n-gram match its row is flat, its
confidence tiny, and the round is a plain target step.

Costs come from a :class:`CostModel`: the models' declared ``latency``
(:class:`~ssd_core.LatencyModel`; deterministic, so runs stay reproducible per seed),
a frozen value given by the user, or ``"measured"`` online from the machine's own
timings (follows the hardware, but then two runs at temperature > 0 may choose
differently and give different -- equally exact -- tokens). Each sequence is priced as
if it paid a whole target pass alone, so a request's choices never depend on what else
is in flight.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from ._errors import ConfigError
from ._math import namespace, to_host

__all__ = [
    "BIN_EDGES",
    "Calibration",
    "CostFit",
    "CostModel",
    "choose_budget",
    "confidence",
    "confidence_rows",
    "hit_curve",
    "keep_length",
    "predict_from",
    "worth_drafting",
]

#: Confidence bins of the calibration table (upper edges).
BIN_EDGES = (0.05, 0.2, 0.4, 0.6, 0.8, 0.9, 0.97, 1.0)
_PRIOR_WEIGHT = 1.0
#: The share of a tree's own time that counts against it in :func:`choose_budget`.
_TREE_WORK = 0.1


def _bin(conf: float) -> int:
    for i, edge in enumerate(BIN_EDGES):
        if conf <= edge:
            return i
    return len(BIN_EDGES) - 1


def _nonneg(_inst: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ConfigError(f"{attribute.name} must be a finite number >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class CostModel:
    """What a round costs, in any unit (only ratios matter).

    Attributes:
        verify_call: the fixed cost of one target pass.
        verify_row: the extra cost of each verified row.
        draft_call: the fixed cost of one draft pass.
        draft_row: the extra cost of each drafted row (one per sequence in a pass).
        draft_prefill_row: the extra cost of each of several tokens of one sequence in
            a pass (catching the draft up with a verified speculation); ``None``: as
            ``draft_row``. On a CPU it is a fraction of ``draft_row``.
    """

    verify_call: float = attrs.field(validator=_nonneg)
    verify_row: float = attrs.field(validator=_nonneg)
    draft_call: float = attrs.field(default=0.0, validator=_nonneg)
    draft_row: float = attrs.field(default=0.0, validator=_nonneg)
    draft_prefill_row: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_nonneg)
    )

    @classmethod
    def memory_bound(cls) -> CostModel:
        """The assumption when no model declares its costs: a memory-bound target (a
        GPU, or a large model on a CPU) whose pass costs about the same for 1 or 8
        rows, and a draft a tenth of its cost."""
        return cls(verify_call=1.0, verify_row=0.02, draft_call=0.1, draft_row=0.002)

    @classmethod
    def from_models(cls, target: Any, draft: Any) -> CostModel:
        """From the models' declared ``latency`` (:class:`~ssd_core.LatencyModel`,
        seconds): the target's, and the draft's if it declares one too (else a tenth
        of the target's pass)."""
        t = getattr(target, "latency", None)
        if t is None:
            return cls.memory_bound()
        d = getattr(draft, "latency", None) if draft is not None else None
        call, row = float(t.per_call), float(t.per_token)
        if d is None:
            return cls(
                verify_call=call, verify_row=row, draft_call=0.1 * (call + row), draft_row=0.0
            )
        return cls(
            verify_call=call,
            verify_row=row,
            draft_call=float(d.per_call),
            draft_row=float(d.per_token),
            # A prefill rate of 0 is the LatencyModel default: not declared.
            draft_prefill_row=float(d.prefill_per_token) if d.prefill_per_token > 0 else None,
        )

    @property
    def draft_glue_row(self) -> float:
        """One token of a draft catching up with a verified speculation."""
        return self.draft_row if self.draft_prefill_row is None else self.draft_prefill_row

    @property
    def draft_step(self) -> float:
        """One just-in-time draft pass for one sequence."""
        return self.draft_call + self.draft_row


def worth_drafting(cost: CostModel) -> bool:
    """Whether any speculation could pay: even a certainly-accepted first token must
    be worth its verified row and the draft pass that made it."""
    base = cost.verify_call + cost.verify_row
    return 2.0 / (base + cost.verify_row + cost.draft_step) > 1.0 / base


def keep_length(
    predictions: Sequence[float], cost: CostModel, *, drafting: bool, start: int = 0
) -> int:
    """How many of the positions (from ``start``) to propose: position j is kept while
    adding it raises expected tokens per unit cost. ``drafting`` charges each position
    a draft pass (just-in-time drafting sits on the critical path; a cached
    speculation's drafting is already paid)."""
    each = cost.verify_row + (cost.draft_step if drafting else 0.0)
    tokens, survive, spent = 1.0, 1.0, cost.verify_call + cost.verify_row
    k = 0
    for a in predictions[start:]:
        survive *= a
        if (tokens + survive) * spent <= tokens * (spent + each):
            break
        tokens += survive
        spent += each
        k += 1
    return k


def confidence_rows(rows: Any) -> Any:
    """The draft's confidence per row -- the largest probability of its temperature-1
    distribution -- as an array on the rows' device (one exp pass; nothing is read
    back)."""
    xp = namespace(rows)
    z = xp.astype(rows, xp.float64) if not xp.isdtype(rows.dtype, "real floating") else rows
    top = xp.max(z, axis=1, keepdims=True)
    total = xp.sum(xp.exp(z - top), axis=1)
    return 1.0 / total


def confidence(rows: Any) -> list[float]:
    """The draft's confidence per row (host floats; one host sync on a device)."""
    return [float(v) for v in to_host(confidence_rows(rows)).tolist()]


class Calibration:
    """A sequence's acceptance rate per confidence bin, learned from its own verified
    positions (accepted ones, and the one rejection that ends a round). The prior, one
    pseudo-observation of acceptance ``(1 + c) / 2`` at the bin's confidence c, leans
    optimistic: a draft's top probability understates how often the target agrees with
    it (greedy), and a draft close to the target is accepted almost always (sampling)."""

    def __init__(self) -> None:
        mids = [(lo + hi) / 2 for lo, hi in zip((0.0, *BIN_EDGES[:-1]), BIN_EDGES)]
        self.accepted = [_PRIOR_WEIGHT * (1.0 + m) / 2 for m in mids]
        self.trials = [_PRIOR_WEIGHT] * len(BIN_EDGES)

    def predict(self, conf: float) -> float:
        i = _bin(conf)
        return self.accepted[i] / self.trials[i]

    def table(self) -> tuple[float, ...]:
        """The current prediction per bin (a frozen copy for a job)."""
        return tuple(a / t for a, t in zip(self.accepted, self.trials))

    def observe(self, confs: Sequence[float], accepted: int, proposed: int) -> None:
        """One verified speculation: its first ``accepted`` positions were accepted and,
        if ``accepted < proposed``, the next one rejected."""
        for j, c in enumerate(confs[: min(accepted + 1, proposed)]):
            i = _bin(c)
            self.trials[i] += 1.0
            if j < accepted:
                self.accepted[i] += 1.0

    def state(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return tuple(self.accepted), tuple(self.trials)


def predict_from(table: Sequence[float], confs: Sequence[float]) -> list[float]:
    """Predicted acceptance per position from a frozen calibration table."""
    return [table[_bin(c)] for c in confs]


class CostFit:
    """``seconds = call + row * rows``, least squares over the calls seen so far (the
    ``"measured"`` cost source)."""

    def __init__(self) -> None:
        self.n = 0
        self.sx = self.sy = self.sxx = self.sxy = 0.0

    def add(self, rows: int, seconds: float) -> None:
        self.n += 1
        self.sx += rows
        self.sy += seconds
        self.sxx += rows * rows
        self.sxy += rows * seconds

    def line(self) -> tuple[float, float] | None:
        """(call, row) once there are enough distinct calls to fit, clamped at 0."""
        if self.n < 4:
            return None
        den = self.n * self.sxx - self.sx * self.sx
        if den <= 0:  # every call had the same number of rows: all of it is per call
            return self.sy / self.n, 0.0
        row = (self.n * self.sxy - self.sx * self.sy) / den
        row = max(row, 0.0)
        call = max((self.sy - row * self.sx) / self.n, 0.0)
        return call, row


def hit_curve(ranks: Sequence[int], r: float) -> Callable[[int], float]:
    """P(the realised token is among a position's top-F candidates), as a function of F:
    the empirical share of observed ranks <= F once there are 8 observations, else the
    prior ``1 - (1 + F)^-r`` (a half at F = 1 for r = 1)."""
    if len(ranks) >= 8:
        ordered = sorted(ranks)
        n = len(ordered)

        def empirical(f: int) -> float:
            return bisect.bisect_right(ordered, f) / n if f >= 1 else 0.0

        return empirical

    def prior(f: int) -> float:
        return 1.0 - (1.0 + f) ** (-max(r, 1e-3)) if f >= 1 else 0.0

    return prior


def choose_budget(
    outcome: Sequence[float],
    hit: Callable[[int], float],
    r: float,
    n: int,
    cost: CostModel,
    most: int,
    *,
    steps: int | None = None,
    overlap: bool = True,
) -> int:
    """The fan-out budget (at most ``most``) that makes an SSD round fastest for an
    ``n``-token speculation, by Saguaro's Theorem 7 with Theorem 12's allocation.

    A round lasts ``max(T_verify, T_tree(B))`` -- the tree is drafted while the target
    verifies, and the next round cannot start before both -- plus, on a cache miss
    (probability ``1 - p_hit(B)``), a just-in-time draft ``T_backup``. ``p_hit`` sums,
    over the outcomes "k accepted" (probabilities ``outcome``, P_0..P_n), the hit rate
    ``hit(F_k)`` of the fan-out Thm 12 (with exponent ``r``) gives that outcome. The expected tokens per round do not depend on B, so the
    best budget is the one with the shortest expected round; a tenth of the tree's own
    time is charged too (it occupies the draft's device, and on a shared CPU a core), so
    a tree whose only gain is to hide a nearly free backup is not built. Without
    ``overlap`` (one thread does both lanes' work) the tree is charged in full: a round
    lasts ``T_verify + T_tree + (1 - p_hit) T_backup``. ``steps`` is how many
    tokens a branch decodes (default ``n``; an empty speculation, n = 0, still caches
    the draft's guesses at the bonus token, each with ``steps`` tokens).
    """
    from ._fanout import outcome_fanout

    m = n if steps is None else steps
    if most <= 0 or m <= 0:
        return 0
    verify = cost.verify_call + cost.verify_row * (n + 1)
    backup = m * cost.draft_step
    glue = cost.draft_call + cost.draft_glue_row * (n + 1)
    best, best_time = 0, verify + backup
    for b in range(1, most + 1):
        plan = outcome_fanout(b, outcome, r) if n else (b,)
        p_hit = sum(w * hit(f) for w, f in zip(outcome, plan))
        tree = glue + m * cost.draft_call + cost.draft_row * m * b
        if overlap:
            time = max(verify, tree) + (1.0 - p_hit) * backup + _TREE_WORK * tree
        else:  # nothing hides the tree: one thread does everything, one after another
            time = verify + tree + (1.0 - p_hit) * backup
        if time < best_time - 1e-12:
            best, best_time = b, time
    return best
