"""How much memory a KV cache needs, and how much this process may still take.

Both are estimates made before llama.cpp allocates anything, so an impossible
configuration is refused with a message instead of growing until the OOM killer ends
the process (a wrapped 32-bit size is refused earlier, in :class:`LlamaOptions`).
"""

from __future__ import annotations

import ctypes
import os
import resource
from pathlib import Path
from typing import Any

import llama_cpp

__all__ = ["available_bytes", "fmt_bytes", "kv_bytes_per_cell"]

#: Bytes per KV element: llama.cpp's default cache type is f16.
_F16 = 2


def _meta_int(model: Any, key: str) -> int | None:
    buf = ctypes.create_string_buffer(64)
    if llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf)) < 0:
        return None
    try:
        return int(buf.value.decode())
    except ValueError:
        return None


def _meta_str(model: Any, key: str) -> str | None:
    buf = ctypes.create_string_buffer(128)
    if llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf)) < 0:
        return None
    return buf.value.decode("utf-8", errors="replace")


def kv_bytes_per_cell(model: Any) -> int:
    """Bytes one KV cell takes over all layers (f16 K and V), from the model's metadata.

    ``n_layer x (n_embd_k_gqa + n_embd_v_gqa) x 2``, where ``n_embd_k_gqa`` is the key
    head size (``{arch}.attention.key_length``, else ``n_embd / n_head``) times the KV
    heads. SmolLM2-135M: 30 x (192 + 192) x 2 = 23,040 bytes. Returns 0 for a model
    without attention heads (a recurrent model's state is not per cell).
    """
    n_layer = int(llama_cpp.llama_model_n_layer(model))
    n_embd = int(llama_cpp.llama_model_n_embd(model))
    n_head = int(llama_cpp.llama_model_n_head(model))
    n_head_kv = int(llama_cpp.llama_model_n_head_kv(model))
    if n_head <= 0 or n_head_kv <= 0:
        return 0
    arch = _meta_str(model, "general.architecture") or "llama"
    k_len = _meta_int(model, f"{arch}.attention.key_length") or n_embd // n_head
    v_len = _meta_int(model, f"{arch}.attention.value_length") or n_embd // n_head
    return n_layer * (k_len + v_len) * n_head_kv * _F16


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    # cgroup v2: this process's group limit minus what the group already uses.
    root = Path("/sys/fs/cgroup")
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        group = root / rel.lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((group / "memory.current").read_text().strip())
    except (OSError, ValueError, IndexError):
        return None


def _address_space_room() -> int | None:
    # ``ulimit -v``: the address space left under RLIMIT_AS.
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return soft - int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes() -> int | None:
    """Memory this process can still allocate: the least of ``MemAvailable``, the
    cgroup's remaining limit and the room under ``ulimit -v`` (``None`` if none is
    known, e.g. off Linux without psutil)."""
    candidates = [_meminfo_available(), _cgroup_room(), _address_space_room()]
    if candidates[0] is None and os.name != "posix":  # pragma: no cover - not Linux
        try:
            import psutil  # type: ignore[import-untyped]

            candidates[0] = int(psutil.virtual_memory().available)
        except ImportError:
            pass
    known = [c for c in candidates if c is not None]
    return max(0, min(known)) if known else None


def fmt_bytes(n: int) -> str:
    """``n`` bytes in MiB, GiB or TiB for messages."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**20:.0f} MiB"
