"""ssd_core: the exact Saguaro (speculative speculative decoding) engine."""

from __future__ import annotations

from ._api import GenerateResult, GenerationError, Stream, StreamEvent, generate, stream
from ._config import FALLBACKS, MODES, SamplingParams, SSDConfig
from ._drivers import DRIVERS
from ._errors import (
    BackendContractError,
    CapacityError,
    ConfigError,
    HandleError,
    InputError,
    InternalError,
    MachineError,
    SSDError,
    UnknownOptionError,
)
from ._events import Lane
from ._fanout import geometric_fanout
from ._latency import LatencyModel
from ._machine import TRANSITIONS, Machine, Phase, Speculation
from ._metrics import Metrics
from ._protocol import Handle, Model, Tokenizer, free_model
from ._random import RandomSource, SeededSource

__all__ = [
    "TRANSITIONS",
    "DRIVERS",
    "FALLBACKS",
    "MODES",
    "free_model",
    "GenerateResult",
    "GenerationError",
    "Lane",
    "Machine",
    "Metrics",
    "Phase",
    "RandomSource",
    "SSDConfig",
    "SamplingParams",
    "SeededSource",
    "Speculation",
    "Stream",
    "StreamEvent",
    "generate",
    "geometric_fanout",
    "stream",
    "BackendContractError",
    "CapacityError",
    "ConfigError",
    "Handle",
    "HandleError",
    "InputError",
    "InternalError",
    "LatencyModel",
    "MachineError",
    "Model",
    "SSDError",
    "Tokenizer",
    "UnknownOptionError",
]
