"""Device, dtype and stream handling, written so every branch also runs on CPU.

CUDA-only behaviour (a private stream per model, stream hand-over of results) goes
through ``torch.get_device_module(device)``, which is ``torch.cuda`` on a GPU and
``torch.cpu`` (whose streams are no-ops) on the CPU, so tests parametrised with
``use_stream=True`` exercise the same code on a CPU-only machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ssd_core import ConfigError

__all__ = ["DeviceContext", "parse_device", "parse_dtype"]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"float32"``/``"bf16"``/``torch.float16``/... to a floating ``torch.dtype``.

    Raises:
        ConfigError: an unknown name or a non-floating dtype.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"torch backend: dtype {dtype} is not a floating dtype")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"torch backend: unknown dtype {dtype!r}; known: {', '.join(_DTYPES)}")
    return _DTYPES[key]


def parse_device(device: str | torch.device | None) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... to a ``torch.device`` that exists here.

    Raises:
        ConfigError: a malformed name, or a CUDA device this machine does not have.
    """
    try:
        dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"torch backend: bad device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"torch backend: device {device!r} requested but CUDA is not available")
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"torch backend: device {device!r} requested, {torch.cuda.device_count()} CUDA devices present"
            )
        dev = torch.device("cuda", index)
    return dev


class DeviceContext:
    """``inference_mode`` plus, optionally, a private stream for one model.

    Args:
        device: where the model lives.
        use_stream: run work on a private stream (default: only on CUDA). Results are
            handed back to the caller's stream, so the caller may use them at once.
    """

    def __init__(self, device: torch.device, use_stream: bool | None = None) -> None:
        self.device = device
        if use_stream is None:
            use_stream = device.type == "cuda"
        self._mod: Any = torch.get_device_module(device) if use_stream else None
        self.stream: Any = None
        if self._mod is not None:
            with self._mod.device(device) if device.type == "cuda" else contextlib.nullcontext():
                self.stream = self._mod.Stream()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        """Enter inference mode (and the private stream, if any)."""
        with torch.inference_mode():
            if self.stream is None:
                yield
                return
            caller = self._mod.current_stream()
            self.stream.wait_stream(caller)
            with self._mod.stream(self.stream):
                yield
            caller.wait_stream(self.stream)

    def hand_over(self, tensor: torch.Tensor) -> torch.Tensor:
        """Tell the caching allocator that ``tensor`` (made on our stream) is used on the
        caller's stream, so its memory is not reused too early (CUDA only)."""
        if self.stream is not None and tensor.device.type == "cuda":
            tensor.record_stream(self._mod.current_stream())
        return tensor
