"""Where OrtModel keeps KV caches and logits: numpy on the host, or torch on a device.

Both kinds offer the same few operations (allocate, point to, copy rows or slots, pick
logits rows), so the model's bookkeeping is written once. :class:`TorchBuffers` keeps
everything on ``cuda:N`` -- onnxruntime reads and writes the tensors in place through
an IOBinding bound to their data pointers, and the logits handed to the core stay on the
device -- and runs with ``device="cpu"`` in the tests, through the very same calls.

ONNX element types are named by their ONNX type strings (``"float"``, ``"float16"``,
``"bfloat16"``, ``"double"``, ``"int64"``, ``"int32"``); bfloat16 has no numpy type, so
bfloat16 graphs need :class:`TorchBuffers`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from ssd_core import ConfigError

__all__ = ["Buffers", "NumpyBuffers", "TorchBuffers", "ONNX_TYPES"]

#: ONNX type string -> (numpy dtype or None, ONNX TensorProto enum, bytes per element).
ONNX_TYPES: dict[str, tuple[Any, int, int]] = {
    "float": (np.float32, 1, 4),
    "float16": (np.float16, 10, 2),
    "double": (np.float64, 11, 8),
    "bfloat16": (None, 16, 2),
    "int64": (np.int64, 7, 8),
    "int32": (np.int32, 6, 4),
}


class Buffers:
    """The operations OrtModel needs on its arrays (see the module docstring)."""

    device_type = "cpu"
    device_id = 0
    on_device = False

    def empty(self, shape: tuple[int, ...], kind: str) -> Any:
        raise NotImplementedError

    def zeros(self, shape: tuple[int, ...], kind: str) -> Any:
        raise NotImplementedError

    def from_host(self, array: np.ndarray) -> Any:
        """A host int array as a buffer on this device (a small upload)."""
        raise NotImplementedError

    def pointer(self, a: Any) -> int:
        raise NotImplementedError

    def row(self, a: Any, b: int) -> Any:
        """Row ``b`` of ``[B, ...]`` as a contiguous ``[1, ...]`` view (no copy)."""
        return a[b : b + 1]

    def gather_slots(
        self, src: Any, row: int, slots: np.ndarray, dst: Any, dst_row: int, start: int
    ) -> None:
        """``dst[dst_row, :, start:start + n] = src[row, :, slots]`` (a device copy)."""
        raise NotImplementedError

    def logits(self, out: Any, index: np.ndarray | None) -> Any:
        """Rows ``index`` of ``out`` flattened to ``[rows, vocab]`` (all when ``None``),
        as float32 (float64 stays float64)."""
        raise NotImplementedError

    def nbytes(self, a: Any) -> int:
        raise NotImplementedError

    def shape(self, a: Any) -> tuple[int, ...]:
        return tuple(a.shape)

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Around one model call (device, stream)."""
        yield

    def hand_over(self, logits: Any) -> Any:
        """Make ``logits`` safe for the caller to read (stream ordering)."""
        return logits


class NumpyBuffers(Buffers):
    """Host arrays (the CPU provider)."""

    def _dtype(self, kind: str) -> Any:
        dtype = ONNX_TYPES[kind][0]
        if dtype is None:
            raise ConfigError(f"{kind} graphs need torch to hold their buffers (pip install torch)")
        return dtype

    def empty(self, shape: tuple[int, ...], kind: str) -> np.ndarray:
        return np.empty(shape, dtype=self._dtype(kind))

    def zeros(self, shape: tuple[int, ...], kind: str) -> np.ndarray:
        return np.zeros(shape, dtype=self._dtype(kind))

    def from_host(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array)

    def pointer(self, a: np.ndarray) -> int:
        return int(a.ctypes.data)

    def gather_slots(
        self,
        src: np.ndarray,
        row: int,
        slots: np.ndarray,
        dst: np.ndarray,
        dst_row: int,
        start: int,
    ) -> None:
        dst[dst_row, :, start : start + len(slots)] = src[row][:, slots]

    def logits(self, out: np.ndarray, index: np.ndarray | None) -> np.ndarray:
        flat = out.reshape(-1, out.shape[-1])
        rows = flat if index is None else flat[index]
        return rows if rows.dtype in (np.float32, np.float64) else rows.astype(np.float32)

    def nbytes(self, a: np.ndarray) -> int:
        return int(a.nbytes)


class TorchBuffers(Buffers):
    """torch tensors on ``device`` (``cuda:N``; ``cpu`` in tests).

    Args:
        device: where the buffers live.
        stream: on CUDA, the torch stream onnxruntime was told to run on
            (``user_compute_stream``), or ``None`` to order by host syncs instead.
    """

    on_device = True

    def __init__(self, device: Any = "cpu", stream: Any = None) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.device_type = self.device.type
        self.device_id = self.device.index or 0
        self.stream = stream
        self._types = {
            "float": torch.float32,
            "float16": torch.float16,
            "double": torch.float64,
            "bfloat16": torch.bfloat16,
            "int64": torch.int64,
            "int32": torch.int32,
        }

    def empty(self, shape: tuple[int, ...], kind: str) -> Any:
        return self.torch.empty(shape, dtype=self._types[kind], device=self.device)

    def zeros(self, shape: tuple[int, ...], kind: str) -> Any:
        return self.torch.zeros(shape, dtype=self._types[kind], device=self.device)

    def from_host(self, array: np.ndarray) -> Any:
        host = self.torch.from_numpy(np.ascontiguousarray(array))
        if self.device_type == "cpu":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def pointer(self, a: Any) -> int:
        return int(a.data_ptr())

    def gather_slots(
        self, src: Any, row: int, slots: np.ndarray, dst: Any, dst_row: int, start: int
    ) -> None:
        n = len(slots)
        if n == 0:
            return
        if int(slots[-1]) - int(slots[0]) + 1 == n:  # contiguous: a slice copy
            part = src[row, :, int(slots[0]) : int(slots[0]) + n]
        else:
            part = src[row].index_select(1, self.from_host(slots.astype(np.int64)))
        dst[dst_row, :, start : start + n].copy_(part)

    def logits(self, out: Any, index: np.ndarray | None) -> Any:
        flat = out.reshape(-1, out.shape[-1])
        rows = (
            flat if index is None else flat.index_select(0, self.from_host(index.astype(np.int64)))
        )
        return rows if rows.dtype in (self.torch.float32, self.torch.float64) else rows.float()

    def nbytes(self, a: Any) -> int:
        return int(a.numel() * a.element_size())

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        if self.device_type != "cuda":
            yield
            return
        cuda = self.torch.cuda
        with cuda.device(self.device):
            if self.stream is None:
                yield
                return
            with cuda.stream(self.stream):
                yield

    def hand_over(self, logits: Any) -> Any:
        if self.device_type != "cuda" or self.stream is None:
            return logits
        cuda = self.torch.cuda
        event = cuda.Event()
        event.record(self.stream)
        consumer = cuda.current_stream(self.device)
        consumer.wait_event(event)
        logits.record_stream(consumer)
        return logits
