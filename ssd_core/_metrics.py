"""Run metrics: counted by the machine, timed by the driver, returned as a value."""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["Metrics", "MetricsRecorder"]


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


@attrs.frozen(kw_only=True)
class Metrics:
    """What one generation run did. Times are seconds (virtual under the simulated driver).

    Counts are summed over the batch; a *round* is one batched verification pass and a
    *sequence-round* one sequence's share of it.
    """

    mode: str
    driver: str
    batch_size: int
    rounds: int
    generated_tokens: int
    target_passes: int
    draft_passes: int
    proposed_tokens: int
    accepted_tokens: int
    sequence_rounds: int
    speculated_rounds: int
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
    target_busy_s: float
    draft_busy_s: float
    wall_s: float
    verify_s: float
    draft_step_s: float

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens."""
        return _ratio(self.accepted_tokens, self.proposed_tokens)

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

    @property
    def target_idle_s(self) -> float:
        return max(self.wall_s - self.target_busy_s, 0.0)

    @property
    def draft_idle_s(self) -> float:
        return max(self.wall_s - self.draft_busy_s, 0.0)

    @property
    def tokens_per_second(self) -> float:
        return _ratio(self.generated_tokens, self.wall_s)

    def as_dict(self) -> dict[str, Any]:
        """Every field and derived rate, JSON-ready."""
        out = attrs.asdict(self)
        for name in (
            "acceptance_rate",
            "mean_accepted_length",
            "tokens_per_target_pass",
            "cache_hit_rate",
            "hit_rate_after_primary",
            "hit_rate_after_backup",
            "mean_accepted_on_hit",
            "mean_accepted_on_miss",
            "target_idle_s",
            "draft_idle_s",
            "tokens_per_second",
        ):
            out[name] = getattr(self, name)
        return out

    def summary(self) -> str:
        """One line for a terminal."""
        parts = [
            f"{self.generated_tokens} tokens in {self.wall_s:.2f}s "
            f"({self.tokens_per_second:.1f} tok/s)"
        ]
        if self.proposed_tokens:
            parts.append(f"acceptance {self.acceptance_rate:.0%}")
            parts.append(f"mean accepted {self.mean_accepted_length:.2f}")
        if self.cache_lookups:
            parts.append(f"cache hits {self.cache_hit_rate:.0%}")
        parts.append(f"{self.tokens_per_target_pass:.2f} tokens/target pass")
        return ", ".join(parts)


@attrs.define
class MetricsRecorder:
    """Mutable counters the machine updates as it goes."""

    rounds: int = 0
    generated_tokens: int = 0
    target_passes: int = 0
    draft_passes: int = 0
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    sequence_rounds: int = 0
    speculated_rounds: int = 0
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
    target_busy_s: float = 0.0
    draft_busy_s: float = 0.0
    verify_s: float = 0.0
    verify_count: int = 0
    draft_step_s: float = 0.0
    draft_step_count: int = 0

    def freeze(self, *, mode: str, driver: str, batch_size: int, wall_s: float) -> Metrics:
        return Metrics(
            mode=mode,
            driver=driver,
            batch_size=batch_size,
            rounds=self.rounds,
            generated_tokens=self.generated_tokens,
            target_passes=self.target_passes,
            draft_passes=self.draft_passes,
            proposed_tokens=self.proposed_tokens,
            accepted_tokens=self.accepted_tokens,
            sequence_rounds=self.sequence_rounds,
            speculated_rounds=self.speculated_rounds,
            cache_lookups=self.cache_lookups,
            cache_hits=self.cache_hits,
            lookups_after_primary=self.lookups_after_primary,
            hits_after_primary=self.hits_after_primary,
            lookups_after_backup=self.lookups_after_backup,
            hits_after_backup=self.hits_after_backup,
            accepted_on_hit=self.accepted_on_hit,
            rounds_on_hit=self.rounds_on_hit,
            accepted_on_miss=self.accepted_on_miss,
            rounds_on_miss=self.rounds_on_miss,
            fallbacks=dict(self.fallbacks),
            target_busy_s=self.target_busy_s,
            draft_busy_s=self.draft_busy_s,
            wall_s=wall_s,
            verify_s=_ratio(self.verify_s, self.verify_count),
            draft_step_s=_ratio(self.draft_step_s, self.draft_step_count),
        )
