"""Latency models: what one backend call costs, for emulation and simulation.

The reference backend can *sleep* for a modelled time on each call (outside the GIL,
so the threaded driver sees real overlap), and the simulated driver *charges* the same
modelled time to a virtual clock. A model of the GPU regime is memory-bound decode: a
fixed cost per forward pass that dwarfs the per-token cost.
"""

from __future__ import annotations

import attrs

__all__ = ["LatencyModel"]


def _non_negative(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0.0:  # also rejects NaN
        from ._errors import ConfigError

        raise ConfigError(f"{attribute.name} must be >= 0 seconds, got {value!r}")


@attrs.frozen(kw_only=True)
class LatencyModel:
    """Cost in seconds of one backend call.

    ``extend`` costs ``per_call + per_token * tokens + per_sequence * sequences``;
    ``open`` (prefill) costs ``per_call + prefill_per_token * tokens``; ``fork``,
    ``truncate`` and ``close`` cost ``per_cache_op`` each.
    """

    per_call: float = attrs.field(default=0.0, validator=_non_negative)
    per_token: float = attrs.field(default=0.0, validator=_non_negative)
    per_sequence: float = attrs.field(default=0.0, validator=_non_negative)
    prefill_per_token: float = attrs.field(default=0.0, validator=_non_negative)
    per_cache_op: float = attrs.field(default=0.0, validator=_non_negative)

    @classmethod
    def gpu_like(cls, forward_s: float = 0.02, per_token_s: float = 0.0002) -> LatencyModel:
        """A memory-bound accelerator: each forward pass costs about ``forward_s``."""
        return cls(
            per_call=forward_s,
            per_token=per_token_s,
            prefill_per_token=per_token_s,
        )

    def extend_cost(self, sequences: int, tokens: int) -> float:
        return self.per_call + self.per_token * tokens + self.per_sequence * sequences

    def open_cost(self, tokens: int) -> float:
        return self.per_call + self.prefill_per_token * tokens

    def cache_op_cost(self, count: int = 1) -> float:
        return self.per_cache_op * count
