"""A ``llama_batch`` whose arrays are numpy arrays, filled with slice assignments.

``llama_batch_init`` mallocs one sequence-id array per row, so filling it from Python
costs five ctypes item assignments per token. Here every field points into a numpy
array this object owns (one ``int32`` per row for the sequence id; each row's
``seq_id`` pointer is set once), so a decode of n tokens costs five slice copies.
The logits buffer llama.cpp returns is read through one cached numpy view.
"""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp
import numpy as np

__all__ = ["Batch", "LogitsView"]


def _ptr(array: np.ndarray, ctype: Any) -> Any:
    return array.ctypes.data_as(ctypes.POINTER(ctype))


class Batch:
    """Room for ``capacity`` tokens, one sequence id each, no embeddings."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        self._n_seq_id = np.ones(capacity, dtype=np.int32)
        seq_t = ctypes.POINTER(llama_cpp.llama_seq_id)
        self._seq_rows = (seq_t * capacity)()
        base, step = self.seq.ctypes.data, self.seq.itemsize
        for i in range(capacity):
            self._seq_rows[i] = ctypes.cast(ctypes.c_void_p(base + i * step), seq_t)
        self.struct = llama_cpp.llama_batch()
        self.struct.n_tokens = 0
        self.struct.token = _ptr(self.token, llama_cpp.llama_token)
        self.struct.embd = None  # type: ignore[assignment]
        self.struct.pos = _ptr(self.pos, llama_cpp.llama_pos)
        self.struct.n_seq_id = _ptr(self._n_seq_id, ctypes.c_int32)
        self.struct.seq_id = ctypes.cast(self._seq_rows, ctypes.POINTER(seq_t))  # type: ignore[assignment]
        self.struct.logits = _ptr(self.logits, ctypes.c_int8)

    def set_one(self, token: int, pos: int, seq: int, *, want_logits: bool) -> None:
        """Load one row (the hot path of plain decoding)."""
        self.token[0] = token
        self.pos[0] = pos
        self.seq[0] = seq
        self.logits[0] = want_logits
        self.struct.n_tokens = 1

    def fill(
        self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, *, want_logits: bool
    ) -> None:
        """Load rows ``0..len(tokens)`` (at most ``capacity``)."""
        n = len(tokens)
        self.token[:n] = tokens
        self.pos[:n] = pos
        self.seq[:n] = seq
        self.logits[:n] = want_logits
        self.struct.n_tokens = n


def _logits_address() -> Any:
    # ``llama_get_logits`` with an integer result: llama-cpp-python's binding returns a
    # ctypes pointer object, which costs a cast per call. A separate function object,
    # so llama-cpp-python's own binding is left as it is.
    lib = llama_cpp.llama_cpp._lib
    return ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(("llama_get_logits", lib))


class LogitsView:
    """Reads the rows of llama.cpp's logits buffer after a decode.

    The buffer is ``rows x vocab`` float32 at an address that changes only when
    llama.cpp reallocates it; the numpy view over it is rebuilt only then.
    """

    _address = staticmethod(_logits_address())

    def __init__(self, vocab_size: int, max_rows: int) -> None:
        self._vocab = vocab_size
        self._rows = max_rows
        self._addr: int | None = None
        self._view: np.ndarray | None = None

    def rows(self, ctx: Any, n: int) -> np.ndarray:
        """A view of the first ``n`` logits rows of the last decode (copy it before the
        next decode overwrites it)."""
        addr = self._address(ctx)
        if not addr:
            return np.empty((0, self._vocab), dtype=np.float32)
        if addr != self._addr or self._view is None:
            ptr = ctypes.cast(ctypes.c_void_p(addr), ctypes.POINTER(ctypes.c_float))
            self._view = np.ctypeslib.as_array(ptr, shape=(self._rows, self._vocab))
            self._addr = addr
        return self._view[:n]

    def reset(self) -> None:
        """Forget the cached view (the context it belonged to is gone)."""
        self._addr = None
        self._view = None
