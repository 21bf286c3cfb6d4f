"""ssd_core: the exact Saguaro (speculative speculative decoding) engine."""

from __future__ import annotations

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
from ._latency import LatencyModel
from ._protocol import Handle, Model, Tokenizer

__all__ = [
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
