"""Metrics: counted by the machine, timed by the driver, returned as values.

Names say what they hold: ``*_total_s`` are sums of seconds, ``*_calls`` counts of
backend calls, ``mean_*_s`` per-call means (derived). Times are virtual under the
simulated driver. A *round* is one batched verification pass; a *sequence-round* is one
sequence's share of it.

Two acceptance rates, because they answer different questions:

* ``accepted_per_proposed`` -- accepted / proposed draft tokens;
* ``acceptance_per_token`` -- the per-token acceptance alpha = accepted / (accepted +
  rejections): the chance that one more draft token is accepted given the previous
  ones were (a round ends at its first rejection). This is the ``a`` of Saguaro's
  Theorem 12 and of the expected tokens per round ``sum_j a^j``.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["Counters", "LaneTimes", "Metrics", "RequestMetrics"]


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


#: Counter fields a request and a whole run share.
_COUNTED = (
    "generated_tokens",
    "sequence_rounds",
    "speculated_rounds",
    "proposed_tokens",
    "accepted_tokens",
    "rejections",
    "cache_lookups",
    "cache_hits",
    "lookups_after_primary",
    "hits_after_primary",
    "lookups_after_backup",
    "hits_after_backup",
    "accepted_on_hit",
    "rounds_on_hit",
    "accepted_on_miss",
    "rounds_on_miss",
)


@attrs.define
class Counters:
    """Mutable counts the machine updates as it goes (per request, and in total)."""

    generated_tokens: int = 0
    sequence_rounds: int = 0
    speculated_rounds: int = 0
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    rejections: int = 0
    cache_lookups: int = 0
    cache_hits: int = 0
    lookups_after_primary: int = 0
    hits_after_primary: int = 0
    lookups_after_backup: int = 0
    hits_after_backup: int = 0
    accepted_on_hit: int = 0
    rounds_on_hit: int = 0
    accepted_on_miss: int = 0
    rounds_on_miss: int = 0
    fallbacks: dict[str, int] = attrs.field(factory=dict)

    def add_fallback(self, kind: str, n: int = 1) -> None:
        self.fallbacks[kind] = self.fallbacks.get(kind, 0) + n


class _Rates:
    """Derived rates over the shared counter fields."""

    generated_tokens: int
    sequence_rounds: int
    speculated_rounds: int
    proposed_tokens: int
    accepted_tokens: int
    rejections: int
    cache_lookups: int
    cache_hits: int
    lookups_after_primary: int
    hits_after_primary: int
    lookups_after_backup: int
    hits_after_backup: int
    accepted_on_hit: int
    rounds_on_hit: int
    accepted_on_miss: int
    rounds_on_miss: int

    @property
    def accepted_per_proposed(self) -> float:
        """Accepted / proposed draft tokens."""
        return _ratio(self.accepted_tokens, self.proposed_tokens)

    @property
    def acceptance_per_token(self) -> float:
        """Per-token acceptance alpha = accepted / (accepted + rejections)."""
        return _ratio(self.accepted_tokens, self.accepted_tokens + self.rejections)

    @property
    def mean_accepted_length(self) -> float:
        """Accepted draft tokens per speculated sequence-round (recovery/bonus excluded)."""
        return _ratio(self.accepted_tokens, self.speculated_rounds)

    @property
    def tokens_per_target_pass(self) -> float:
        """Generated tokens per target pass *per sequence* (1.0 for AR)."""
        return _ratio(self.generated_tokens, self.sequence_rounds)

    @property
    def cache_hit_rate(self) -> float:
        return _ratio(self.cache_hits, self.cache_lookups)

    @property
    def hit_rate_after_primary(self) -> float:
        return _ratio(self.hits_after_primary, self.lookups_after_primary)

    @property
    def hit_rate_after_backup(self) -> float:
        return _ratio(self.hits_after_backup, self.lookups_after_backup)

    @property
    def mean_accepted_on_hit(self) -> float:
        """Mean accepted length of speculations served from the cache."""
        return _ratio(self.accepted_on_hit, self.rounds_on_hit)

    @property
    def mean_accepted_on_miss(self) -> float:
        """Mean accepted length of speculations that came from a fallback."""
        return _ratio(self.accepted_on_miss, self.rounds_on_miss)

    _RATES = (
        "accepted_per_proposed",
        "acceptance_per_token",
        "mean_accepted_length",
        "tokens_per_target_pass",
        "cache_hit_rate",
        "hit_rate_after_primary",
        "hit_rate_after_backup",
        "mean_accepted_on_hit",
        "mean_accepted_on_miss",
    )


@attrs.frozen(kw_only=True)
class RequestMetrics(_Rates):
    """What the engine did for one request (its own rounds only)."""

    prompt_tokens: int
    generated_tokens: int
    sequence_rounds: int
    speculated_rounds: int
    proposed_tokens: int
    accepted_tokens: int
    rejections: int
    cache_lookups: int
    cache_hits: int
    lookups_after_primary: int
    hits_after_primary: int
    lookups_after_backup: int
    hits_after_backup: int
    accepted_on_hit: int
    rounds_on_hit: int
    accepted_on_miss: int
    rounds_on_miss: int
    fallbacks: dict[str, int]

    @classmethod
    def of(cls, counters: Counters, *, prompt_tokens: int) -> RequestMetrics:
        values = {name: getattr(counters, name) for name in _COUNTED}
        return cls(prompt_tokens=prompt_tokens, fallbacks=dict(counters.fallbacks), **values)

    def as_dict(self) -> dict[str, Any]:
        """Every field and derived rate, JSON-ready."""
        out = attrs.asdict(self)
        out.update({name: getattr(self, name) for name in self._RATES})
        return out


@attrs.define
class LaneTimes:
    """Busy time per lane and per kind of call, accumulated by the machine from the
    elapsed times its driver reports."""

    target_busy_s: float = 0.0
    draft_busy_s: float = 0.0
    target_passes: int = 0
    draft_passes: int = 0
    open_total_s: float = 0.0
    open_calls: int = 0
    verify_total_s: float = 0.0
    verify_calls: int = 0
    jit_draft_total_s: float = 0.0
    jit_draft_calls: int = 0
    glue_total_s: float = 0.0
    glue_calls: int = 0
    tree_step_total_s: float = 0.0
    tree_step_calls: int = 0
    cache_op_total_s: float = 0.0
    cache_op_calls: int = 0


@attrs.frozen(kw_only=True)
class Metrics(_Rates):
    """What a run (or an engine so far) did, summed over its sequences.

    Besides the counts and rates shared with :class:`RequestMetrics`: ``rounds``
    (batched verification passes), backend calls and busy seconds per lane and per
    kind of call (``verify``, ``jit_draft`` for just-in-time drafting, ``glue`` and
    ``tree_step`` for SSD's draft-side work, ``open``, ``cache_op`` for fork/close),
    ``draft_faults`` (draft-lane failures survived by degrading to target-only
    rounds), and ``wall_s``.
    """

    mode: str
    driver: str
    batch_size: int
    rounds: int
    generated_tokens: int
    sequence_rounds: int
    speculated_rounds: int
    proposed_tokens: int
    accepted_tokens: int
    rejections: int
    cache_lookups: int
    cache_hits: int
    lookups_after_primary: int
    hits_after_primary: int
    lookups_after_backup: int
    hits_after_backup: int
    accepted_on_hit: int
    rounds_on_hit: int
    accepted_on_miss: int
    rounds_on_miss: int
    fallbacks: dict[str, int]
    draft_faults: int
    target_passes: int
    draft_passes: int
    target_busy_s: float
    draft_busy_s: float
    open_total_s: float
    open_calls: int
    verify_total_s: float
    verify_calls: int
    jit_draft_total_s: float
    jit_draft_calls: int
    glue_total_s: float
    glue_calls: int
    tree_step_total_s: float
    tree_step_calls: int
    cache_op_total_s: float
    cache_op_calls: int
    wall_s: float

    @classmethod
    def of(
        cls,
        counters: Counters,
        times: LaneTimes,
        *,
        mode: str,
        driver: str,
        batch_size: int,
        rounds: int,
        draft_faults: int,
        wall_s: float,
    ) -> Metrics:
        values = {name: getattr(counters, name) for name in _COUNTED}
        return cls(
            mode=mode,
            driver=driver,
            batch_size=batch_size,
            rounds=rounds,
            fallbacks=dict(counters.fallbacks),
            draft_faults=draft_faults,
            wall_s=wall_s,
            **values,
            **attrs.asdict(times),
        )

    @property
    def mean_verify_s(self) -> float:
        """Mean seconds per verification call."""
        return _ratio(self.verify_total_s, self.verify_calls)

    @property
    def mean_jit_draft_s(self) -> float:
        """Mean seconds per just-in-time draft step (one batched draft pass)."""
        return _ratio(self.jit_draft_total_s, self.jit_draft_calls)

    @property
    def mean_glue_s(self) -> float:
        """Mean seconds per glue pass."""
        return _ratio(self.glue_total_s, self.glue_calls)

    @property
    def mean_tree_step_s(self) -> float:
        """Mean seconds per tree-decode step (all branches of a round in one call)."""
        return _ratio(self.tree_step_total_s, self.tree_step_calls)

    @property
    def target_idle_s(self) -> float:
        return max(self.wall_s - self.target_busy_s, 0.0)

    @property
    def draft_idle_s(self) -> float:
        return max(self.wall_s - self.draft_busy_s, 0.0)

    @property
    def tokens_per_second(self) -> float:
        return _ratio(self.generated_tokens, self.wall_s)

    _DERIVED = (
        "mean_verify_s",
        "mean_jit_draft_s",
        "mean_glue_s",
        "mean_tree_step_s",
        "target_idle_s",
        "draft_idle_s",
        "tokens_per_second",
    )

    def as_dict(self) -> dict[str, Any]:
        """Every field and derived rate, JSON-ready."""
        out = attrs.asdict(self)
        out.update({name: getattr(self, name) for name in self._RATES + self._DERIVED})
        return out

    def summary(self) -> str:
        """One line for a terminal."""
        parts = [
            f"{self.generated_tokens} tokens in {self.wall_s:.2f}s "
            f"({self.tokens_per_second:.1f} tok/s)"
        ]
        if self.proposed_tokens:
            parts.append(f"acceptance {self.acceptance_per_token:.0%} per token")
            parts.append(f"mean accepted {self.mean_accepted_length:.2f}")
        if self.cache_lookups:
            parts.append(f"cache hits {self.cache_hit_rate:.0%}")
        parts.append(f"{self.tokens_per_target_pass:.2f} tokens/target pass")
        if self.draft_faults:
            parts.append(f"{self.draft_faults} draft fault(s) survived")
        return ", ".join(parts)
