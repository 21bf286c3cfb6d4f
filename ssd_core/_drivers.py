"""Drivers: carry out the machine's work on real models.

* ``sequential`` -- one request at a time, draft lane first (so an SSD tree is always
  complete before its verification returns), on the engine's own thread:
  deterministic, for tests.
* ``threaded`` -- a worker thread per model runs whole jobs (every request of a job,
  with its math and draws), so the draft and the target really run at the same time
  (llama.cpp, torch and onnxruntime release the GIL) and a round costs one hand-off
  per job, not one per request. The engine thread blocks on one queue: no busy-waiting.
* ``simulated`` -- one request at a time, but each is charged its modelled latency
  (a model's ``latency`` attribute, else the measured time) on a virtual clock per
  lane, so the reported times are what two truly parallel devices would see.

The seam: a driver reaches each lane only through an :class:`Executor` -- "run this
job, tell me when it is done" -- so a later driver can put a lane in another process
or on another host (a job is a picklable value: frozen inputs in, a typed result out)
without touching the machine. Every backend call holds the model's lock
(:func:`~ssd_core.model_lock`), so one model may serve both lanes or two engines.
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ._jobs import Job
from ._protocol import Model, model_lock
from ._requests import Lane, Request, cost_of, perform

__all__ = ["DRIVERS", "Executor", "WorkerExecutor", "call"]

log = logging.getLogger("ssd_core")

DRIVERS = ("sequential", "threaded", "simulated")


def call(model: Model, request: Request) -> tuple[Any, float]:
    """Perform ``request`` on ``model`` under the model's lock; (result, seconds)."""
    with model_lock(model):
        t0 = time.perf_counter()
        result = perform(model, request)
        return result, time.perf_counter() - t0


def run_job(model: Model, job: Job, started: Callable[[float], None] | None = None) -> None:
    """Run every request of ``job`` on ``model`` until it is done (exceptions propagate).
    ``started(t)`` is told when each backend call begins (for call timeouts)."""
    while True:
        req = job.next()
        if req is None:
            return
        if started is not None:
            started(time.monotonic())
        result, elapsed = call(model, req)
        if started is not None:
            started(0.0)
        job.receive(req, result, elapsed)


class Executor:
    """Runs one job at a time for the lanes mapped to it and reports completion.

    ``submit(job, lane)`` starts the job; when it ends, ``("done", lane, job, exc)`` is
    put on the driver's completion queue (``exc`` is ``None`` on success).
    """

    busy: bool = False

    def submit(self, job: Job, lane: Lane) -> None:
        raise NotImplementedError

    def close(self, timeout: float | None = None) -> bool:
        """Stop; returns ``False`` if a job was still running after ``timeout``."""
        raise NotImplementedError


class WorkerExecutor(Executor):
    """A worker thread bound to one model (the threaded driver's lane)."""

    def __init__(self, model: Model, done: queue.SimpleQueue[Any], name: str) -> None:
        self.model = model
        self.done = done
        self.inbox: queue.SimpleQueue[tuple[Job, Lane] | None] = queue.SimpleQueue()
        #: monotonic time the running backend call started, or 0.0 between calls.
        self.call_started = 0.0
        #: Set when the engine gave up on a stuck call: the thread is never used again.
        self.abandoned = False
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _started(self, t: float) -> None:
        self.call_started = t

    def _loop(self) -> None:
        while True:
            item = self.inbox.get()
            if item is None:
                return
            job, lane = item
            try:
                run_job(self.model, job, self._started)
            except BaseException as exc:
                self.call_started = 0.0
                self.done.put(("done", lane, job, exc))
            else:
                self.done.put(("done", lane, job, None))

    def submit(self, job: Job, lane: Lane) -> None:
        self.busy = True
        self.inbox.put((job, lane))

    def close(self, timeout: float | None = None) -> bool:
        self.inbox.put(None)
        self.thread.join(timeout)
        return not self.thread.is_alive()


class SimulatedClock:
    """Per-lane virtual time for the simulated driver."""

    def __init__(self) -> None:
        self.now = 0.0
        self.free_at = {Lane.DRAFT: 0.0, Lane.TARGET: 0.0}
        self._pending: list[tuple[float, int, Lane, Request, Any, float, BaseException | None]] = []
        self._order = 0

    def start(self, lane: Lane, model: Model, req: Request) -> None:
        exc: BaseException | None = None
        result: Any = None
        try:
            result, measured = call(model, req)
        except Exception as err:
            exc, measured = err, 0.0
        modelled = cost_of(model, req)
        cost = measured if modelled is None else modelled
        finish = max(self.now, self.free_at[lane]) + cost
        self.free_at[lane] = finish
        heapq.heappush(self._pending, (finish, self._order, lane, req, result, cost, exc))
        self._order += 1

    def __bool__(self) -> bool:
        return bool(self._pending)

    def pop(self) -> tuple[Lane, Request, Any, float, BaseException | None]:
        finish, _, lane, req, result, cost, exc = heapq.heappop(self._pending)
        self.now = finish
        return lane, req, result, cost, exc
