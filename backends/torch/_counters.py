"""Counters for what makes GPU decoding slow: host syncs and bytes copied.

:func:`count_host_syncs` counts the calls that block the host on a CUDA tensor (a
``torch.overrides.TorchFunctionMode``): reading a value (``.item()``, ``bool()``,
``int()``, ``float()``, ``.tolist()``, ``.numpy()``, ``.cpu()``, ``.to("cpu")``),
uploading host data with ``torch.tensor/as_tensor/asarray(..., device=...)`` (a pageable
host-to-device copy the host waits for), and ops whose output shape depends on the data
(``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``). With
``simulate=True`` every tensor counts as a device tensor, so the same count is taken on a
CPU-only machine (CI): ``bool(cpu_tensor)`` is then a sync, because it would be one on
the GPU; a copy counts as a download only when its destination is spelled ``"cpu"``
(``.to(x.device)`` is taken for a move to the device), and blocking uploads by
``Tensor.to`` cannot be told from no-ops, so only real runs count them. Modes are per thread: count with the sequential driver, or inside the thread
that does the work.

:func:`count_copies` counts the bytes written by data-movement ops (a
``TorchDispatchMode``): ``cat``, ``stack``, padding, ``copy_``/``_to_copy``, ``clone``,
``index_select``/``index``/``gather``, ``index_copy``/``index_put``/``scatter`` and
``repeat``, and ``reshape``/``contiguous``/``flatten`` when they had to copy. It sees
everything under it -- the backend's own KV copies and the model's internal ones (e.g.
transformers' ``repeat_kv`` for grouped-query attention) -- broken down by op.

Both are reusable by tests (a regression test asserts a count) and by
``scripts/gpu_check.py``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import traceback
import weakref
from collections.abc import Iterator
from typing import Any

import attrs
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CopyCounter", "HostSyncCounter", "count_copies", "count_host_syncs"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_READS = {
    "item",
    "tolist",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "__complex__",
    "numpy",
    "cpu",
}
_DATA_SHAPED = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"}
_UPLOADS = {"tensor", "as_tensor", "asarray"}


def _device_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device | None:
    """The target device of a ``Tensor.to(...)`` call, if it names one."""
    if "device" in kwargs and kwargs["device"] is not None:
        return torch.device(kwargs["device"])
    for a in args:
        if isinstance(a, torch.device):
            return a
        if isinstance(a, str):
            return torch.device(a)
        if isinstance(a, int) and not isinstance(a, bool):
            return torch.device("cuda", a)
        if isinstance(a, torch.Tensor):
            return a.device
    return None


@attrs.define
class HostSyncCounter:
    """What :func:`count_host_syncs` counted.

    Attributes:
        simulate: CPU tensors counted as device tensors.
        by_kind: calls per kind (``"item"``, ``"__bool__"``, ``"upload:tensor"``, ...).
        sites: calls per ``file:line kind`` of the nearest caller outside torch (only
            when ``sites=True``).
    """

    simulate: bool = False
    by_kind: collections.Counter[str] = attrs.field(factory=collections.Counter)
    sites: collections.Counter[str] = attrs.field(factory=collections.Counter)
    record_sites: bool = False
    _last: str | None = attrs.field(default=None, init=False, repr=False)
    # results of counted downloads (by id, weakly): on the host even when simulated, so
    # reading them afterwards (``x.to("cpu").numpy()``) is not a second sync
    _host: dict[int, Any] = attrs.field(factory=dict, init=False, repr=False)

    @property
    def total(self) -> int:
        """All host syncs counted."""
        return sum(self.by_kind.values())

    def _mark_host(self, t: torch.Tensor) -> None:
        if len(self._host) > 4096:  # forget dead tensors
            self._host = {k: r for k, r in self._host.items() if r() is not None}
        self._host[id(t)] = weakref.ref(t)

    def _on_device(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        ref = self._host.get(id(t))
        if ref is not None and ref() is t:  # a counted download's result: on the host
            return False
        return self.simulate or t.device.type not in ("cpu", "meta")

    def _add(self, kind: str) -> None:
        self._last = kind
        self.by_kind[kind] += 1
        if self.record_sites:
            for frame in reversed(traceback.extract_stack()):
                if not frame.filename.startswith(_TORCH_DIR) and frame.filename != __file__:
                    self.sites[f"{frame.filename}:{frame.lineno} {kind}"] += 1
                    break

    def classify(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Count one torch call if it blocks the host (see the module docstring)."""
        first = args[0] if args else None
        if name in _READS or name in _DATA_SHAPED:
            if self._on_device(first):
                self._add(name)
        elif name == "__getitem__":
            index = args[1] if len(args) > 1 else None
            parts = index if isinstance(index, tuple) else (index,)
            if self._on_device(first) and any(
                isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts
            ):
                self._add("bool-mask index")
        elif name == "repeat_interleave":
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            if (
                isinstance(repeats, torch.Tensor)
                and self._on_device(repeats)
                and kwargs.get("output_size") is None
            ):
                self._add("repeat_interleave")
        elif name in _UPLOADS:
            if kwargs.get("device") is None:
                return
            dev = torch.device(kwargs["device"])
            on_device = self.simulate or dev.type not in ("cpu", "meta")
            if isinstance(first, torch.Tensor):  # a copy to the device only from the host
                if not self.simulate and first.device.type == "cpu" and on_device:
                    self._add(f"upload:{name}")
            elif on_device:  # Python or numpy data: a pageable copy the host waits for
                self._add(f"upload:{name}")
        elif name in ("to", "copy_"):
            if not isinstance(first, torch.Tensor):
                return
            dst_dev: torch.device | None
            if name == "copy_":
                src = args[1] if len(args) > 1 else kwargs.get("src")
                dst_dev, src_t = first.device, src
            else:
                dst_dev, src_t = _device_arg(args[1:], kwargs), first
            if dst_dev is None or not isinstance(src_t, torch.Tensor):
                return
            if kwargs.get("non_blocking", False):
                return
            # Simulated, every tensor is on "the device", so only a destination spelled
            # "cpu" means the host; .to(x.device) (a torch.device) is a no-op there.
            spelled = any(a == "cpu" for a in args[1:]) or kwargs.get("device") == "cpu"
            if self.simulate and dst_dev.type == "cpu" and not spelled:
                return
            if dst_dev.type == "cpu" and self._on_device(src_t):
                self._add(f"download:{name}")
            elif (
                not self.simulate
                and src_t.device.type == "cpu"
                and dst_dev.type not in ("cpu", "meta")
            ):
                self._add(f"upload:{name}")


class _SyncMode(TorchFunctionMode):
    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        counter = self.counter
        counter._last = None
        with contextlib.suppress(TypeError, ValueError, RuntimeError):  # odd arguments:
            counter.classify(name, tuple(args), kwargs)  # torch will complain itself
        out = func(*args, **kwargs)
        if counter._last in ("cpu", "download:to", "download:copy_"):
            if name != "copy_" and args and out is args[0]:
                # simulated, ``.cpu()``/``.to("cpu")`` hands back the same tensor; on a
                # GPU it is a new host tensor, so make it one (the device tensor stays)
                out = out.clone()
            target = args[0] if name == "copy_" else out
            if isinstance(target, torch.Tensor):
                counter._mark_host(target)
        return out


@contextlib.contextmanager
def count_host_syncs(*, simulate: bool = False, sites: bool = False) -> Iterator[HostSyncCounter]:
    """Count host-blocking torch calls made in this thread while the block runs.

    Args:
        simulate: count CPU tensors as device tensors (for CPU-only CI).
        sites: also record where each sync was made (``counter.sites``; slower).

    Yields:
        A :class:`HostSyncCounter`, filled in as the block runs.

    Example::

        with count_host_syncs(simulate=True) as syncs:
            generate(target, draft, prompts=..., mode="ssd", driver="sequential")
        per_round = syncs.total / result.metrics.rounds
    """
    counter = HostSyncCounter(simulate=simulate, record_sites=sites)
    with _SyncMode(counter):
        yield counter


# -- bytes copied ---------------------------------------------------------------------

_COPY_OPS = {
    "cat",
    "stack",
    "constant_pad_nd",
    "copy_",
    "_to_copy",
    "clone",
    "index_select",
    "index",
    "gather",
    "index_copy",
    "index_copy_",
    "index_put",
    "index_put_",
    "scatter",
    "scatter_",
    "repeat",
    "take_along_dim",
    "masked_select",
    "_unsafe_index",
}


#: Ops that return a view when they can and copy otherwise (e.g. reshaping an expanded
#: tensor, transformers' ``repeat_kv``): counted only when the result has new storage.
_MAYBE_COPY = {"reshape", "contiguous", "flatten", "repeat_interleave"}


def _new_storage(out: Any, src: Any) -> bool:
    if not isinstance(out, torch.Tensor) or not isinstance(src, torch.Tensor):
        return False
    try:
        return out.untyped_storage().data_ptr() != src.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage
        return False


@attrs.define
class CopyCounter:
    """What :func:`count_copies` counted.

    Attributes:
        by_op: bytes written per aten op name.
        calls: op calls per aten op name.
    """

    by_op: collections.Counter[str] = attrs.field(factory=collections.Counter)
    calls: collections.Counter[str] = attrs.field(factory=collections.Counter)

    @property
    def total(self) -> int:
        """All bytes written by data-movement ops."""
        return sum(self.by_op.values())


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(y) for y in x)
    return 0


# torch leaves TorchDispatchMode's __init_subclass__ and __init__ unannotated
class _CopyMode(TorchDispatchMode):  # type: ignore[no-untyped-call]
    def __init__(self, counter: CopyCounter) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.counter = counter

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _MAYBE_COPY and args and _new_storage(out, args[0]):
            self.counter.by_op[name] += _nbytes(out)
            self.counter.calls[name] += 1
        elif name in _COPY_OPS:
            if name in ("index_copy_", "index_copy"):
                written = _nbytes(args[3] if len(args) > 3 else kwargs.get("source"))
            elif name in ("index_put_", "index_put"):
                written = _nbytes(args[2] if len(args) > 2 else kwargs.get("values"))
            elif name in ("scatter_", "scatter"):
                src = args[3] if len(args) > 3 else kwargs.get("src")
                written = _nbytes(src) if isinstance(src, torch.Tensor) else _nbytes(args[2])
            else:
                written = _nbytes(out)
            self.counter.by_op[name] += written
            self.counter.calls[name] += 1
        return out


@contextlib.contextmanager
def count_copies() -> Iterator[CopyCounter]:
    """Count bytes written by data-movement ops in this thread while the block runs.

    Yields:
        A :class:`CopyCounter`, filled in as the block runs.
    """
    counter = CopyCounter()
    with _CopyMode(counter):
        yield counter
