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

Every driver reaches a model through a :class:`Backend`, which also keeps the *ledger*
of the handles that model gave this engine and that the engine has not yet tried to
close. Cleanup closes exactly what the ledger holds: whatever failed or was cancelled
where, no handle is left behind and none is closed twice. A backend that changes the
array type of its logits between calls is refused there
(:class:`~ssd_core.BackendContractError`), before the math mixes two namespaces.
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ._errors import BackendContractError
from ._jobs import Job
from ._protocol import Handle, Model, model_lock
from ._requests import Close, Extend, Fork, Lane, Open, Request, cost_of, perform

__all__ = ["DRIVERS", "Backend", "Executor", "WorkerExecutor", "run_job"]

log = logging.getLogger("ssd_core")

DRIVERS = ("sequential", "threaded", "simulated")


def _type_name(x: object) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}"


class Backend:
    """One model as an engine uses it: every call under the model's lock, the ledger of
    the handles it gave out per lane, and the array type of its logits.

    The same object serves both lanes when the target is the draft; each lane's
    handles are kept apart, so losing the draft lane closes only the draft's.
    """

    def __init__(self, model: Model) -> None:
        self.model = model
        self.name = str(getattr(model, "name", "model"))
        self._ledger: dict[Lane, dict[Handle, None]] = {Lane.TARGET: {}, Lane.DRAFT: {}}
        self._guard = threading.Lock()
        self._array_type: type | None = None

    def call(self, request: Request) -> tuple[Any, float]:
        """Perform ``request`` under the model's lock; (result, seconds).

        The ledger learns every handle an ``Open``/``Fork`` made and forgets every
        handle a ``Close`` tried (closed or not: a handle is never closed twice).

        Raises:
            BackendContractError: the logits are not of the array type this model's
                earlier logits had.
            Exception: whatever the backend raised.
        """
        with model_lock(self.model):
            t0 = time.perf_counter()
            try:
                result = perform(self.model, request)
            finally:
                if isinstance(request, Close):
                    self._forget(request.lane, request.handles)
            elapsed = time.perf_counter() - t0
            if isinstance(request, (Open, Fork)):
                with self._guard:
                    self._ledger[request.lane].update(dict.fromkeys(result))
        if isinstance(request, Extend):
            self._check_type(result, request)
        return result, elapsed

    def _check_type(self, logits: Any, request: Extend) -> None:
        kind = type(logits)
        with self._guard:
            if self._array_type is None:
                self._array_type = kind
                return
            first = self._array_type
        if kind is not first:
            raise BackendContractError(
                f"backend {self.name!r} returned {request.purpose.value} logits as "
                f"{_type_name(logits)} after returning {first.__module__}.{first.__qualname__}: "
                "a model must return one array type from every call"
            )

    def _forget(self, lane: Lane, handles: Iterable[Handle]) -> None:
        with self._guard:
            held = self._ledger[lane]
            for h in handles:
                held.pop(h, None)

    def live(self, lane: Lane | None = None) -> list[Handle]:
        """Handles given out and not yet closed (on ``lane``, or on both)."""
        with self._guard:
            lanes = [lane] if lane is not None else list(Lane)
            return [h for ln in lanes for h in self._ledger[ln]]

    def close(self, lane: Lane, handles: Iterable[Handle] | None = None) -> None:
        """Close ``handles`` (default: every live one) of ``lane`` that are still live,
        each at most once. A close that raises is logged; the rest go on."""
        with model_lock(self.model):
            with self._guard:
                held = self._ledger[lane]
                todo = list(held) if handles is None else [h for h in handles if h in held]
                for h in todo:
                    del held[h]
            for h in todo:
                try:
                    self.model.close(h)
                except Exception as exc:  # the backend is broken: say so, keep going
                    log.warning(
                        "closing %s handle %r of %s failed: %r", lane.value, h, self.name, exc
                    )

    def close_all(self) -> None:
        """Close every live handle of both lanes."""
        for lane in Lane:
            self.close(lane)


def run_job(
    backend: Backend,
    job: Job,
    started: Callable[[float], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> None:
    """Run every request of ``job`` until it is done (exceptions propagate), or until
    ``stop()`` says the engine gave up on it. ``started(t)`` is told when each backend
    call begins and ``started(0.0)`` when it ends (for call timeouts)."""
    while stop is None or not stop():
        req = job.next()
        if req is None:
            return
        if started is not None:
            started(time.monotonic())
        try:
            result, elapsed = backend.call(req)
        finally:
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

    def __init__(self, backend: Backend, done: queue.SimpleQueue[Any], name: str) -> None:
        self.backend = backend
        self.done = done
        self.inbox: queue.SimpleQueue[tuple[Job, Lane] | Callable[[], None] | None] = (
            queue.SimpleQueue()
        )
        #: monotonic time the running backend call started, or 0.0 between calls.
        self.call_started = 0.0
        #: Set when the engine gave up on a stuck call: the thread is never given
        #: another job; it finishes what it was told to when the call returns, and ends.
        self.abandoned = False
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _started(self, t: float) -> None:
        self.call_started = t

    def _stopped(self) -> bool:
        return self.abandoned

    def _loop(self) -> None:
        while True:
            item = self.inbox.get()
            if item is None:
                return
            if callable(item):
                try:
                    item()
                except Exception as exc:  # a last cleanup on an abandoned lane
                    log.warning("cleanup on %s failed: %r", self.backend.name, exc)
                continue
            job, lane = item
            try:
                run_job(self.backend, job, self._started, self._stopped)
            except BaseException as exc:
                self.done.put(("done", lane, job, exc))
            else:
                self.done.put(("done", lane, job, None))

    def submit(self, job: Job, lane: Lane) -> None:
        self.busy = True
        self.inbox.put((job, lane))

    def abandon(self, then: Callable[[], None]) -> None:
        """Give up on the running job: it stops at its next request; ``then`` runs on
        this thread once the stuck call has returned, and the thread ends. The engine
        does not wait for it."""
        self.abandoned = True
        self.inbox.put(then)
        self.inbox.put(None)

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

    def start(self, lane: Lane, backend: Backend, req: Request) -> None:
        exc: BaseException | None = None
        result: Any = None
        try:
            result, measured = backend.call(req)
        except Exception as err:
            exc, measured = err, 0.0
        modelled = cost_of(backend.model, req)
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
