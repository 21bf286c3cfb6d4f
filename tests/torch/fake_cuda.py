"""A fake ``torch.cuda`` for checking stream ordering on a CPU-only machine.

Streams record the work queued on them and what they waited for; ``ordered_after``
answers "is everything queued on stream A before now guaranteed to finish before what is
queued next on stream B?" from the recorded waits, the way CUDA orders streams.
Patched onto the real ``torch.cuda`` module with ``monkeypatch`` (see :func:`install`),
so code that goes through ``torch.get_device_module(device)`` sees it.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from typing import Any

import torch

_clock = itertools.count()


class FakeStream:
    """A stream's history: queued ops and waits, each stamped with a global time."""

    def __init__(self, fake: FakeCuda, device: int, name: str) -> None:
        self.fake, self.device, self.name = fake, device, name
        self.ops: list[str] = []
        self.history: list[tuple[int, str, Any, int]] = []  # (time, kind, what, cutoff)

    def _add_op(self, name: str) -> None:
        self.ops.append(name)
        self.history.append((next(_clock), "op", name, 0))

    def wait_stream(self, other: FakeStream) -> None:
        self.history.append((next(_clock), "wait", other, next(_clock)))

    def wait_event(self, event: FakeEvent) -> None:
        if event.stream is not None:
            self.history.append((next(_clock), "wait", event.stream, event.cutoff))

    def record_event(self, event: FakeEvent | None = None) -> FakeEvent:
        event = event or FakeEvent(self.fake)
        event.record(self)
        return event

    def synchronize(self) -> None:
        self.fake.host_syncs += 1

    def __repr__(self) -> str:
        return f"<FakeStream {self.name} cuda:{self.device}>"


class FakeEvent:
    def __init__(self, fake: FakeCuda, enable_timing: bool = False, **_: Any) -> None:
        self.fake = fake
        self.stream: FakeStream | None = None
        self.cutoff = 0
        self.covered = 0  # ops of the stream before the event

    def record(self, stream: FakeStream | None = None) -> None:
        stream = stream or self.fake.current_stream()
        self.stream, self.cutoff, self.covered = stream, next(_clock), len(stream.ops)

    def synchronize(self) -> None:
        self.fake.host_syncs += 1


class FakeTensor:
    """Stands for a CUDA tensor: a device and ``record_stream``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.recorded_on: list[FakeStream] = []

    def record_stream(self, stream: FakeStream) -> None:
        self.recorded_on.append(stream)


class FakeCuda:
    def __init__(self, devices: int = 2) -> None:
        self.n = devices
        self.defaults = [FakeStream(self, d, f"default{d}") for d in range(devices)]
        self._local = threading.local()
        self.created: list[FakeStream] = []
        self.host_syncs = 0

    # -- thread-local current device / streams
    def _state(self) -> Any:
        if not hasattr(self._local, "device"):
            self._local.device = 0
            self._local.current = {}
        return self._local

    def _index(self, device: Any) -> int:
        if device is None:
            return self._state().device
        if isinstance(device, int):
            return device
        dev = torch.device(device)
        return self._state().device if dev.index is None else dev.index

    def current_device(self) -> int:
        return self._state().device

    def current_stream(self, device: Any = None) -> FakeStream:
        d = self._index(device)
        return self._state().current.get(d, self.defaults[d])

    def default_stream(self, device: Any = None) -> FakeStream:
        return self.defaults[self._index(device)]

    def Stream(self, device: Any = None, priority: int = 0, **_: Any) -> FakeStream:  # noqa: N802
        d = self._index(device)
        s = FakeStream(self, d, f"private{len(self.created)}")
        self.created.append(s)
        return s

    def Event(self, enable_timing: bool = False, **kw: Any) -> FakeEvent:  # noqa: N802
        return FakeEvent(self, enable_timing=enable_timing, **kw)

    @contextlib.contextmanager
    def stream(self, s: FakeStream | None) -> Any:
        if s is None:
            yield
            return
        st = self._state()
        prev = st.current.get(s.device)
        st.current[s.device] = s
        try:
            yield
        finally:
            if prev is None:
                del st.current[s.device]
            else:
                st.current[s.device] = prev

    @contextlib.contextmanager
    def device(self, device: Any) -> Any:
        st = self._state()
        prev = st.device
        st.device = self._index(device)
        try:
            yield
        finally:
            st.device = prev

    def set_device(self, device: Any) -> None:
        self._state().device = self._index(device)

    def synchronize(self, device: Any = None) -> None:
        self.host_syncs += 1

    # -- what a kernel launch does: queue work on the current stream of its device
    def launch(self, device: int, name: str) -> None:
        self.current_stream(device)._add_op(name)

    # -- ordering question
    def ordered_after(self, consumer: FakeStream, producer: FakeStream, op: str) -> bool:
        """Is work queued next on ``consumer`` ordered after ``op`` on ``producer``?"""
        op_time = next(t for t, kind, what, _ in producer.history if kind == "op" and what == op)
        todo, seen = [(consumer, next(_clock))], set()
        while todo:
            stream, cutoff = todo.pop()
            if stream is producer and op_time < cutoff:
                return True
            for t, kind, what, their_cutoff in stream.history:
                if kind == "wait" and t < cutoff and (id(what), their_cutoff) not in seen:
                    seen.add((id(what), their_cutoff))
                    todo.append((what, their_cutoff))
        return False


def install(monkeypatch: Any, devices: int = 2) -> FakeCuda:
    """Patch ``torch.cuda`` with a :class:`FakeCuda` of ``devices`` GPUs."""
    fake = FakeCuda(devices)
    cuda = torch.cuda
    for name in (
        "current_stream",
        "default_stream",
        "Stream",
        "Event",
        "stream",
        "device",
        "set_device",
        "synchronize",
        "current_device",
    ):
        monkeypatch.setattr(cuda, name, getattr(fake, name))
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: devices)
    return fake
