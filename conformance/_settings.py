"""How hard and how strictly the suite checks: one frozen value passed to every check."""

from __future__ import annotations

from typing import Any

import attrs

from ssd_core import ConfigError

from ._watchdog import DEFAULT_TIMEOUT

__all__ = ["Settings", "default_tolerance"]


def _non_negative(
    instance: object, attribute: attrs.Attribute[float | None], value: float | None
) -> None:
    if value is not None and not value >= 0.0:
        raise ConfigError(f"{attribute.name} must be >= 0 (or None for automatic), got {value}")


def _timeout(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not value > 0.0):
        raise ConfigError(f"timeout must be > 0 seconds (or None for no limit), got {value!r}")


def _positive_int(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{attribute.name} must be a positive int, got {value!r}")


def default_tolerance(bits: int) -> float:
    """The automatic absolute logits tolerance for a backend's logits dtype width.

    Args:
        bits: 64 for float64 logits, 32 for float32, 16 for float16/bfloat16.

    Returns:
        0.0 (exact) for 64-bit, 1e-4 for 32-bit, 1e-2 for anything narrower.
    """
    if bits >= 64:
        return 0.0
    if bits >= 32:
        return 1e-4
    return 1e-2


@attrs.frozen(kw_only=True)
class Settings:
    """Knobs of one conformance run.

    Attributes:
        tolerance: largest absolute difference allowed between two logits that should
            be equal (same context through different handles, prefill vs extend, fork
            vs fresh). ``None``: chosen from the logits dtype (see
            :func:`default_tolerance`).
        batch_tolerance: the same, for a request scored in a batch vs alone. ``None``:
            equal to ``tolerance``. Engines whose kernels change with batch size
            (llama.cpp at >= 64 tokens without flash attention) need more here.
        quick: fewer and shorter sequences (the ``--quick`` budget) vs ``--full``.
        seed: seed of the token sequences and of the random walk.
        n_handles: how many handles must be open at once (tree decoding keeps one per
            branch alive, ~20-30 per sequence).
        max_context: the capacity check fills a handle to ``context_size``; it is
            skipped when ``context_size`` is larger than this. ``None``: 256 quick
            (filling 1024 tokens of SmolLM2 on 2 cores takes minutes), 4096 full.
        seq_len: length of the token sequences most checks use (capped at
            ``context_size``); ``None``: 10 quick, 24 full.
        walk_runs: how many random walks (``None``: 1 quick, 6 full).
        walk_steps: operations per walk (``None``: 60 quick, 250 full).
        reference_tolerance: largest difference allowed between the model's rows and a
            reference scorer's (the ``reference_logits`` check, compared as
            log-probabilities). ``None``: the larger of ``tolerance`` and
            ``batch_tolerance``.
        timeout: seconds each check may run before it is reported as failed (timed
            out) and abandoned, and the remaining checks are not run; ``None``: no limit.
    """

    tolerance: float | None = attrs.field(default=None, validator=_non_negative)
    batch_tolerance: float | None = attrs.field(default=None, validator=_non_negative)
    quick: bool = True
    seed: int = 0
    n_handles: int = attrs.field(default=32, validator=_positive_int)
    max_context: int | None = None
    seq_len: int | None = None
    walk_runs: int | None = None
    walk_steps: int | None = None
    reference_tolerance: float | None = attrs.field(default=None, validator=_non_negative)
    timeout: float | None = attrs.field(default=DEFAULT_TIMEOUT, validator=_timeout)

    @property
    def length(self) -> int:
        """The sequence length checks aim for (before capping at ``context_size``)."""
        return self.seq_len if self.seq_len is not None else (10 if self.quick else 24)

    @property
    def context_limit(self) -> int:
        """The largest ``context_size`` the capacity check fills."""
        if self.max_context is not None:
            return self.max_context
        return 256 if self.quick else 4096

    @property
    def runs(self) -> int:
        """Number of random walks."""
        return self.walk_runs if self.walk_runs is not None else (1 if self.quick else 6)

    @property
    def steps(self) -> int:
        """Operations per random walk."""
        return self.walk_steps if self.walk_steps is not None else (60 if self.quick else 250)

    def describe(self, tolerance: float, batch_tolerance: float, *, reference: bool = False) -> str:
        """One line for the report header, with the tolerances actually used."""
        mode = "quick" if self.quick else "full"
        text = (
            f"{mode}, tolerance {tolerance:g}, batch tolerance {batch_tolerance:g}, "
            f"seed {self.seed}, {self.n_handles} handles"
        )
        if reference:
            ref = (
                self.reference_tolerance
                if self.reference_tolerance is not None
                else max(tolerance, batch_tolerance)
            )
            text += f", reference tolerance {ref:g}"
        limit = "none" if self.timeout is None else f"{self.timeout:g} s"
        return text + f", timeout {limit} per check"
