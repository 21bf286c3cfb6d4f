"""The exception hierarchy.

Everything the library raises on purpose derives from :class:`SSDError`. The tree splits
the way h11's does: *you* broke the rules (bad configuration or input, misuse of a
handle), a *backend* broke the Model protocol, or *we* did (an internal bug). Each leaf
also subclasses the matching builtin so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "BackendContractError",
    "EngineClosedError",
    "GenerationError",
    "LaneTimeoutError",
    "CapacityError",
    "ConfigError",
    "HandleError",
    "InputError",
    "InternalError",
    "MachineError",
    "SSDError",
    "UnknownOptionError",
]


class SSDError(Exception):
    """Root of every error this library raises on purpose."""


class ConfigError(SSDError, ValueError):
    """A configuration value is out of range or inconsistent (K, fan-out, C, sampling)."""


class UnknownOptionError(ConfigError):
    """A name (mode, driver, fallback, backend) is not one of the known choices."""


class InputError(SSDError, ValueError):
    """A request is malformed: empty prompt, token id outside the vocabulary, ..."""


class HandleError(SSDError, KeyError):
    """A sequence handle is unknown, already closed, or used past its length."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want a sentence.
        return str(self.args[0]) if self.args else ""


class CapacityError(SSDError, RuntimeError):
    """A backend cannot hold more tokens or more sequences than it was built for."""


class BackendContractError(SSDError, RuntimeError):
    """A backend broke the Model protocol (wrong shape, NaN/inf logits, bad handle).

    The message names the backend and the request that produced the bad answer.
    """


class MachineError(SSDError, RuntimeError):
    """The state machine was driven wrongly, or is in its ERROR state after a failure."""


class EngineClosedError(MachineError):
    """A request was submitted to (or waited on from) an engine that has shut down."""


class GenerationError(SSDError, RuntimeError):
    """A run failed part-way; nothing committed before the fault is lost.

    ``partial`` holds what was generated before the failure: a
    :class:`~ssd_core.GenerateResult` from :func:`~ssd_core.generate` and
    :func:`~ssd_core.stream`, a :class:`~ssd_core.RequestResult` from an engine
    request. The original exception is the ``__cause__``.
    """

    def __init__(self, message: str, partial: object = None) -> None:
        super().__init__(message)
        self.partial = partial


class LaneTimeoutError(GenerationError, TimeoutError):
    """A backend call on the *target* lane (or on a draft that is also the target) ran
    past its timeout. The stuck call may still be running in its worker thread: that
    model's handles are closed by the worker when the call returns, never under it
    (see ``docs/reliability.md``)."""


class InternalError(SSDError, RuntimeError):
    """An invariant of this library failed: a bug here, please report it."""
