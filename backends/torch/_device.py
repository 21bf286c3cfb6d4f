"""Devices, placement, streams and events, written so every branch also runs on CPU.

Theory of operation. A model's weights may live on one device or be spread over several
(a ``device_map`` from accelerate, or a module the user placed by hand). A
:class:`Placement` records where the input ids must go (the embedding's device), where
the logits come out (the LM head's device) and every device that holds weights.

:class:`DeviceContext` gives each model a *private stream on every device it uses*. A
call runs like this::

    with ctx():                      # set_device(input device); inference mode; each
        ...                          # private stream becomes ITS device's current stream
                                     # (at the first call it first waits for the caller's
                                     # stream there, e.g. for weights just written); all
                                     # work (uploads, forward) is queued there
    logits = ctx.hand_over(logits)   # one event recorded on the private stream of the
                                     # logits' device; the caller's current stream on that
                                     # device waits for it (no host block); the allocator
                                     # is told the tensor is used on that stream

Every stream call names its device: ``current_stream(device)``, never the thread's
current device, because a driver thread's current device is ``cuda:0`` whatever device
the model lives on. The consumer (the core) reads the logits on the default stream of
the logits' device, which is the stream :meth:`DeviceContext.hand_over` makes wait, so
nothing reads the logits before the forward that wrote them has finished.

The private streams do *not* wait for the caller's stream on every call: the caller's
stream waits for every result handed over, so a per-call wait would chain two models on
one GPU (draft hands over, the target's next call waits for the draft's work) and kill
the overlap SSD needs. A model's inputs come from the host and its KV pool is touched
only on its own streams, so one wait at the first call (weights written by the caller)
is enough; call :meth:`DeviceContext.resync` after changing weights in place.

CUDA-only calls go through ``torch.get_device_module(device)``: ``torch.cuda`` on a GPU
and ``torch.cpu`` on the CPU, whose streams and events exist and do nothing, so tests
parametrised with ``use_stream=True`` run the same code on a CPU-only machine, and a
test can substitute a fake ``torch.cuda`` to check the ordering (tests/torch/test_streams.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import attrs
import torch

from ssd_core import ConfigError

__all__ = [
    "DeviceContext",
    "Placement",
    "hf_embeddings",
    "parse_device",
    "parse_dtype",
    "ready_event",
    "upload",
]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
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


def parse_device(device: str | int | torch.device | None) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``1``, ... to a ``torch.device`` that exists here.

    Raises:
        ConfigError: a malformed name, or a CUDA device this machine does not have.
    """
    try:
        if isinstance(device, int) and not isinstance(device, bool):
            dev = torch.device("cuda", device)
        else:
            dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"torch backend: bad device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"torch backend: device {device!r} requested but CUDA is not available"
            )
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"torch backend: device {device!r} requested, {torch.cuda.device_count()} CUDA devices present"
            )
        dev = torch.device("cuda", index)
    return dev


def _as_device(value: Any) -> torch.device:
    """A device-map value (``0``, ``"cuda:1"``, ``"cpu"``, a ``torch.device``) as a device."""
    if isinstance(value, torch.device):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cuda", value)
    text = str(value)
    if text in ("disk", "meta"):
        raise ConfigError(
            f"torch backend: weights offloaded to {text!r} are not supported; "
            "give every module a cpu or cuda device"
        )
    dev = torch.device(text)
    return torch.device("cuda", 0) if dev.type == "cuda" and dev.index is None else dev


def _unique(devices: Iterable[torch.device]) -> tuple[torch.device, ...]:
    out: list[torch.device] = []
    for d in devices:
        if d not in out:
            out.append(d)
    return tuple(out)


@attrs.frozen(kw_only=True)
class Placement:
    """Where a model's weights live.

    Attributes:
        input: the device the input ids, positions and mask are built on (the
            embedding's device).
        output: the device the logits come out on (the LM head's device).
        devices: every device holding weights, ``input`` first; one private stream each.
    """

    input: torch.device
    output: torch.device
    devices: tuple[torch.device, ...]

    @classmethod
    def single(cls, device: torch.device) -> Placement:
        """Everything on ``device``."""
        return cls(input=device, output=device, devices=(device,))

    @classmethod
    def from_device_map(
        cls, device_map: Mapping[str, Any], *, input_module: str, output_module: str
    ) -> Placement:
        """Read an accelerate ``device_map`` (module name -> device).

        Args:
            device_map: e.g. ``{"model.embed_tokens": 0, "model.layers.0": 0,
                "model.layers.1": 1, "model.norm": 1, "lm_head": 1}``; values are CUDA
                ordinals, ``"cpu"``, ``"cuda:N"`` or ``torch.device``; ``""`` maps the
                whole model.
            input_module: the embedding's module name (``"model.embed_tokens"``).
            output_module: the LM head's module name (``"lm_head"``).

        Raises:
            ConfigError: an empty map, a module the map does not cover, or weights
                offloaded to disk/meta.
        """
        if not device_map:
            raise ConfigError("torch backend: empty device_map")

        def lookup(name: str) -> torch.device:
            best = None
            for key in device_map:
                covers = key == "" or name == key or name.startswith(key + ".")
                if covers and (best is None or len(key) > len(best)):
                    best = key
            if best is None:
                raise ConfigError(f"torch backend: device_map does not place {name!r}")
            return _as_device(device_map[best])

        devices = _unique(_as_device(v) for v in device_map.values())
        first = lookup(input_module)
        return cls(input=first, output=lookup(output_module), devices=_unique((first, *devices)))

    @classmethod
    def of_module(cls, module: torch.nn.Module) -> Placement:
        """Where ``module``'s weights are (an accelerate map if it has one, else its
        parameters: the input embedding's device, the output layer's device).

        Raises:
            ConfigError: a module without parameters or with weights on disk/meta.
        """
        device_map = getattr(module, "hf_device_map", None)
        names = {id(m): n for n, m in module.named_modules()}
        emb = hf_embeddings(module, "input")
        out = hf_embeddings(module, "output")
        if isinstance(device_map, Mapping) and device_map and emb is not None and out is not None:
            return cls.from_device_map(
                device_map,
                input_module=names.get(id(emb), ""),
                output_module=names.get(id(out), ""),
            )
        params = [p.device for p in module.parameters()]
        if not params:
            raise ConfigError("torch backend: the module has no parameters, so no device")
        if any(d.type == "meta" for d in params):
            raise ConfigError("torch backend: the module has weights on the meta device")
        first = next(emb.parameters()).device if emb is not None else params[0]
        last = next(out.parameters()).device if out is not None else params[-1]
        return cls(input=first, output=last, devices=_unique((first, *params)))


def hf_embeddings(
    module: torch.nn.Module, which: Literal["input", "output"]
) -> torch.nn.Module | None:
    """``module.get_input_embeddings()`` / ``get_output_embeddings()`` of a transformers
    model; ``None`` for a module without that method.

    Looked up with ``getattr``: to mypy any other attribute of a module is a tensor or a
    submodule, neither of which it lets be called.
    """
    get = getattr(module, f"get_{which}_embeddings", None)
    found: torch.nn.Module | None = get() if get is not None else None
    return found


def _module(device: torch.device) -> Any:
    return torch.get_device_module(device)


def upload(values: Any, device: torch.device) -> torch.Tensor:
    """Host int64 data to ``device`` without blocking the host.

    On CUDA the data goes through pinned memory (the caching host allocator keeps the
    page-locked block alive until the copy, queued on the current stream, is done) and a
    ``non_blocking`` copy; on CPU it is the tensor itself.

    Args:
        values: a 1-D numpy int64 array or a list of ints.
        device: where the tensor is needed.
    """
    host = torch.as_tensor(values, dtype=torch.long)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def ready_event(tensor: torch.Tensor) -> Any:
    """The event recorded when ``tensor`` (logits from :meth:`TorchModel.extend`) was
    handed over, or ``None`` (CPU, no private stream). A consumer on a stream of its own
    makes it wait with ``stream.wait_event(ready_event(logits))``; the default stream of
    the logits' device already waits."""
    return getattr(tensor, "_ssd_ready_event", None)


class DeviceContext:
    """``inference_mode``, the model's device, and its private streams (see module docs).

    Args:
        placement: a :class:`Placement`, or one ``torch.device`` for a single-device model.
        use_stream: run on private streams (default: when any device is CUDA).
        timing: record a start and an end event per call (:attr:`timings`).

    Attributes:
        placement: the :class:`Placement`.
        device: the output device (where logits are handed over).
        streams: device -> private stream (empty when ``use_stream`` is off).
        stream: the private stream on the output device, or ``None``.
        last_event: the event recorded by the latest :meth:`hand_over`, or ``None``.
        timings: ``(start, end)`` event pairs (CUDA) or ``perf_counter`` pairs (CPU),
            one per call, when ``timing`` is on.
    """

    def __init__(
        self,
        placement: Placement | torch.device,
        use_stream: bool | None = None,
        *,
        timing: bool = False,
    ) -> None:
        if isinstance(placement, torch.device):
            placement = Placement.single(placement)
        self.placement = placement
        self.device = placement.output
        if use_stream is None:
            use_stream = any(d.type == "cuda" for d in placement.devices)
        self.streams: dict[torch.device, Any] = {}
        if use_stream:
            for dev in placement.devices:
                mod = _module(dev)
                with mod.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
                    self.streams[dev] = mod.Stream()
        self.stream: Any = self.streams.get(self.device)
        self._synced = False
        self.last_event: Any = None
        self.timing = timing
        self.timings: list[tuple[Any, Any]] = []

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        """Run the body on the model's devices and private streams, in inference mode."""
        first = self.placement.input
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if first.type == "cuda":
                stack.enter_context(_module(first).device(first))
            for dev, stream in self.streams.items():
                mod = _module(dev)
                if not self._synced:  # after what the caller queued (e.g. the weights)
                    stream.wait_stream(mod.current_stream(dev))
                stack.enter_context(mod.stream(stream))
            self._synced = True
            start = self._mark()
            yield
            if self.timing:
                self.timings.append((start, self._mark()))

    def resync(self) -> None:
        """Order the next call after the caller's streams again (weights changed)."""
        self._synced = False

    def _mark(self) -> Any:
        if not self.timing:
            return None
        dev = self.device
        if dev.type == "cuda":
            event = _module(dev).Event(enable_timing=True)
            event.record(self.streams.get(dev) or _module(dev).current_stream(dev))
            return event
        return time.perf_counter()

    def hand_over(self, tensor: torch.Tensor) -> torch.Tensor:
        """Order the caller's stream on ``tensor``'s device after the private stream's work.

        One event is recorded on the private stream of ``tensor.device``; the caller's
        current stream *on that device* waits for it (a queued wait, not a host block),
        and on CUDA the caching allocator is told the tensor is used there. The event is
        kept as :attr:`last_event` and on the tensor (:func:`ready_event`).
        """
        dev = tensor.device
        stream = self.streams.get(dev)
        if stream is None:
            return tensor
        mod = _module(dev)
        event = mod.Event()
        event.record(stream)
        consumer = mod.current_stream(dev)
        consumer.wait_event(event)
        if dev.type == "cuda":
            tensor.record_stream(consumer)
        self.last_event = event
        with contextlib.suppress(AttributeError, TypeError):  # a subclass without __dict__
            tensor._ssd_ready_event = event  # type: ignore[attr-defined]
        return tensor
