"""Loading a GGUF file through transformers without parsing it three times.

Where the time goes (SmolLM2-135M Q4_1, 1 thread, measured with cProfile and by phase,
docs/torch.md): transformers reads the GGUF's metadata once for the config, once for
the tokenizer and once more for the weights -- each a fresh ``gguf.GGUFReader`` that
walks every field of the file (49152 token strings, 48900 merges) through
``numpy.memmap`` slicing, whose Python-level ``__getitem__``/``__array_finalize__``
dominate (6.3 s per parse) -- and maps tensor names by building
``gguf.get_tensor_name_map`` once per submodule (397 times, ~3 s). Dequantising the
272 tensors themselves takes ~3 s.

:func:`fast_gguf` patches, for the duration of a load:

* ``gguf.GGUFReader`` -> one reader per file (keyed by path, size and mtime) whose
  data is a plain ``ndarray`` view of the memory map (same bytes, no memmap subclass
  overhead: 2.0 s instead of 6.3 s per parse);
* ``gguf.get_tensor_name_map`` -> memoised per (architecture, layer count);
* ``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`` -> the
  metadata-only result (``return_tensors=False``: config and tokenizer) computed once
  per file and handed out as deep copies.

The patched functions return what the originals return (the tests compare a load with
and without them); only repeated work is skipped. transformers imports these names
inside its functions, so module attributes are what it finds. Missing names (another
transformers or gguf version) are simply left alone.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["fast_gguf"]

_log = logging.getLogger(__name__)
_LOCK = threading.RLock()


def _file_key(path: Any) -> tuple[str, int, int]:
    p = os.path.abspath(os.fspath(path))
    st = os.stat(p)
    return (p, st.st_size, st.st_mtime_ns)


@contextlib.contextmanager
def fast_gguf() -> Iterator[None]:
    """Within the block, transformers' GGUF loading parses each file once (see module
    docstring). Re-entrant; thread-safe (loads inside the block are serialised)."""
    try:
        import gguf as gguf_module
        import numpy as np
        import transformers.modeling_gguf_pytorch_utils as mg_module
    except ImportError:  # nothing to speed up: transformers will say what is missing
        yield
        return
    gguf: Any = gguf_module  # patched below: typed loosely on purpose
    mg: Any = mg_module
    with _LOCK:
        if getattr(gguf.GGUFReader, "_ssd_fast", False):  # already inside a block
            yield
            return
        base_reader = gguf.GGUFReader
        base_map = getattr(gguf, "get_tensor_name_map", None)
        base_load: Any = getattr(mg, "load_gguf_checkpoint", None)
        cache: dict[tuple[str, int, int], Any] = {}
        metadata: dict[tuple[str, int, int], Any] = {}

        class _Reader(base_reader):  # type: ignore[misc,valid-type]
            """One parsed reader per file; ``data`` a plain ndarray over the same mapping."""

            _ssd_fast = True

            _ssd_ready: bool

            def __new__(cls, path: Any, mode: Any = "r") -> Any:
                if mode != "r":  # a writer: the real class, untouched
                    return base_reader(path, mode)
                key = _file_key(path)
                if key not in cache:
                    obj = super().__new__(cls)
                    obj._ssd_ready = False
                    cache[key] = obj
                return cache[key]

            def __init__(self, path: Any, mode: Any = "r") -> None:
                if not self._ssd_ready:
                    super().__init__(path, mode)
                    self._ssd_ready = True

            @property
            def data(self) -> Any:
                return self._ssd_data

            @data.setter
            def data(self, value: Any) -> None:
                self._ssd_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

        def load(path: Any, return_tensors: bool = False, *args: Any, **kwargs: Any) -> Any:
            if return_tensors or args or kwargs.get("model_to_load") is not None:
                return base_load(path, return_tensors, *args, **kwargs)
            key = _file_key(path)
            if key not in metadata:
                metadata[key] = base_load(path, return_tensors=False)
            return copy.deepcopy(metadata[key])

        gguf.GGUFReader = _Reader
        if base_map is not None:
            gguf.get_tensor_name_map = functools.lru_cache(maxsize=16)(base_map)
        if base_load is not None:
            mg.load_gguf_checkpoint = load
        try:
            yield
        finally:
            gguf.GGUFReader = base_reader
            if base_map is not None:
                gguf.get_tensor_name_map = base_map
            if base_load is not None:
                mg.load_gguf_checkpoint = base_load
            cache.clear()
            metadata.clear()
