"""User-facing configuration values: sampling parameters and the SSD configuration."""

from __future__ import annotations

import math
from typing import Any, Literal

import attrs

from ._errors import ConfigError, UnknownOptionError

__all__ = ["FALLBACKS", "MODES", "SSDConfig", "SamplingParams"]

MODES = ("ar", "sd", "ssd")
FALLBACKS = ("neural", "fast", "auto")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _token_tuple(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    return tuple(int(t) for t in value)


def _stop_sequences(value: Any) -> tuple[tuple[int, ...], ...]:
    out = tuple(tuple(int(t) for t in seq) for seq in value)
    for seq in out:
        _check(len(seq) > 0, "stop_sequences must not contain an empty sequence")
    return out


@attrs.frozen(kw_only=True)
class SamplingParams:
    """How tokens are chosen, per sequence.

    Attributes:
        temperature: target temperature; ``0`` is greedy (lowest id among ties).
        top_k: keep the ``top_k`` most likely tokens (ties at the boundary kept); 0 = off.
        top_p: nucleus sampling mass in ``(0, 1]``; 1 = off.
        min_p: drop tokens below ``min_p`` times the most likely one's probability.
        draft_temperature: the draft's temperature; ``None`` = same as ``temperature``.
            Any value is lossless: the verifier uses the distribution the draft sampled.
        stop_token_ids: ids that end the sequence (kept in the output); ``None`` = the
            target tokenizer's EOS ids, if it has a tokenizer.
        stop_sequences: token sequences that end the sequence when generated (kept).
        ignore_eos: do not stop on the tokenizer's EOS ids.

    Generation is exact with respect to the *processed* target distribution.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    draft_temperature: float | None = None
    stop_token_ids: tuple[int, ...] | None = attrs.field(default=None, converter=_token_tuple)
    stop_sequences: tuple[tuple[int, ...], ...] = attrs.field(default=(), converter=_stop_sequences)
    ignore_eos: bool = False

    def __attrs_post_init__(self) -> None:
        _check(
            _is_real(self.temperature) and 0.0 <= self.temperature < math.inf,
            f"temperature must be a finite number >= 0, got {self.temperature!r}",
        )
        _check(
            isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0,
            f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}",
        )
        _check(
            _is_real(self.top_p) and 0.0 < self.top_p <= 1.0,
            f"top_p must be in (0, 1], got {self.top_p!r}",
        )
        _check(
            _is_real(self.min_p) and 0.0 <= self.min_p <= 1.0,
            f"min_p must be in [0, 1], got {self.min_p!r}",
        )
        if self.draft_temperature is not None:
            _check(
                _is_real(self.draft_temperature) and 0.0 <= self.draft_temperature < math.inf,
                f"draft_temperature must be a finite number >= 0, got {self.draft_temperature!r}",
            )

    @property
    def effective_draft_temperature(self) -> float:
        return self.temperature if self.draft_temperature is None else self.draft_temperature


def _fanout(value: Any) -> int | tuple[int, ...]:
    if isinstance(value, bool):
        raise ConfigError(f"fanout must be an int budget or a list of ints, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"fanout must be an int budget or a list of ints, got {value!r}"
        ) from None


def _optional_fanout(value: Any) -> int | tuple[int, ...] | None:
    return None if value is None else _fanout(value)


@attrs.frozen(kw_only=True)
class SSDConfig:
    """Speculation settings.

    Attributes:
        k: draft tokens per speculation (K >= 1).
        fanout: the speculation-cache fan-out. An int is a budget B = sum of F_k per
            sequence, allocated each round by the capped geometric rule of Saguaro's
            Thm 12 from the acceptance rate and power-law exponent estimated online.
            A list of K + 1 ints fixes F_0..F_K (F_k candidates for "k accepted").
        fanout_after_backup: the same, for rounds whose speculation came from the
            fallback; ``None`` = estimate (or use) ``fanout`` separately for them.
        saguaro_c: Saguaro sampling constant C in (0, 1]: the draft down-weights the
            tokens it caches by C, which raises the cache hit rate. 1 = plain sampling.
        fallback: on a cache miss, ``"neural"`` drafts just in time with the draft
            model, ``"fast"`` proposes cheap n-gram backup tokens (verified as point
            masses), ``"auto"`` chooses per round from measured hit rate, times and
            batch size (Saguaro Thm 17).
        rank_window: how many recent outcomes the online estimators remember.
    """

    k: int = 4
    fanout: int | tuple[int, ...] = attrs.field(default=12, converter=_fanout)
    fanout_after_backup: int | tuple[int, ...] | None = attrs.field(
        default=None, converter=_optional_fanout
    )
    saguaro_c: float = 1.0
    fallback: Literal["neural", "fast", "auto"] = "auto"
    rank_window: int = 512

    def __attrs_post_init__(self) -> None:
        _check(
            isinstance(self.k, int) and not isinstance(self.k, bool) and self.k >= 1,
            f"k must be an int >= 1, got {self.k!r}",
        )
        for name in ("fanout", "fanout_after_backup"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, int):
                _check(value >= 0, f"{name} budget must be >= 0, got {value}")
            else:
                _check(
                    len(value) == self.k + 1,
                    f"{name} list must have K + 1 = {self.k + 1} entries (F_0..F_K), got {len(value)}",
                )
                _check(all(f >= 0 for f in value), f"{name} entries must be >= 0, got {value}")
        _check(
            _is_real(self.saguaro_c) and 0.0 < self.saguaro_c <= 1.0,
            f"saguaro_c must be in (0, 1], got {self.saguaro_c!r}",
        )
        if self.fallback not in FALLBACKS:
            raise UnknownOptionError(
                f"unknown fallback {self.fallback!r}; choose one of {', '.join(FALLBACKS)}"
            )
        _check(self.rank_window >= 1, f"rank_window must be >= 1, got {self.rank_window}")
