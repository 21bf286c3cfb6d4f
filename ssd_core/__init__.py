"""ssd_core: the exact Saguaro (speculative speculative decoding) engine.

The public surface: :class:`Engine` (requests that join and leave a running engine),
:func:`generate` and :func:`stream` (one call, one batch), the value types
(:class:`SamplingParams`, :class:`SSDConfig`, :class:`Metrics`, ...), the
:class:`Model` protocol backends implement, the :class:`Machine` itself (sans-I/O),
and the error tree rooted at :class:`SSDError`. :mod:`ssd_core.testing` holds the
hooks tests and the conformance suite use; :mod:`ssd_core.app` the command line.
"""

from __future__ import annotations

from ._api import GenerateResult, Stream, generate, stream
from ._config import FALLBACKS, MODES, SamplingParams, SSDConfig
from ._drivers import DRIVERS
from ._engine import Engine, RequestHandle, RequestResult, StreamEvent
from ._errors import (
    BackendContractError,
    CapacityError,
    ConfigError,
    EngineClosedError,
    GenerationError,
    HandleError,
    InputError,
    InternalError,
    LaneTimeoutError,
    MachineError,
    SSDError,
    UnknownOptionError,
)
from ._fanout import (
    OutcomeStats,
    default_budget,
    default_saguaro_c,
    geometric_fanout,
    outcome_fanout,
    uniform_fanout,
)
from ._latency import LatencyModel
from ._machine import MACHINE_TRANSITIONS, Machine, MachineState
from ._metrics import Metrics, RequestMetrics
from ._policy import CostModel
from ._protocol import Handle, Model, Tokenizer, free_model, model_lock
from ._random import RandomSource, SeededSource
from ._random import Stream as RandomStream
from ._requests import Lane
from ._sequence import SEQUENCE_TRANSITIONS, Speculation, Stage

__all__ = [
    "DRIVERS",
    "FALLBACKS",
    "MACHINE_TRANSITIONS",
    "MODES",
    "SEQUENCE_TRANSITIONS",
    "BackendContractError",
    "CapacityError",
    "ConfigError",
    "CostModel",
    "Engine",
    "EngineClosedError",
    "GenerateResult",
    "GenerationError",
    "Handle",
    "HandleError",
    "InputError",
    "InternalError",
    "Lane",
    "LaneTimeoutError",
    "LatencyModel",
    "Machine",
    "MachineError",
    "MachineState",
    "Metrics",
    "Model",
    "OutcomeStats",
    "RandomSource",
    "RandomStream",
    "RequestHandle",
    "RequestMetrics",
    "RequestResult",
    "SSDConfig",
    "SSDError",
    "SamplingParams",
    "SeededSource",
    "Speculation",
    "Stage",
    "Stream",
    "StreamEvent",
    "Tokenizer",
    "UnknownOptionError",
    "free_model",
    "generate",
    "default_budget",
    "default_saguaro_c",
    "geometric_fanout",
    "outcome_fanout",
    "uniform_fanout",
    "model_lock",
    "stream",
]
