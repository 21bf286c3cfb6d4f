"""Drivers: carry out the machine's requests on real models.

* ``sequential`` -- one request at a time, draft lane first (so an SSD tree is always
  complete before its verification returns): deterministic, for tests.
* ``threaded`` -- a worker thread per lane, so the draft and the target really run at
  the same time (llama.cpp, torch and onnxruntime release the GIL). The main thread
  blocks on a completion queue: no busy-waiting.
* ``simulated`` -- one request at a time, but each is charged its modelled latency
  (a model's ``latency`` attribute, else the measured time) on a virtual clock per
  lane, so the reported times are what two truly parallel devices would see.

All three are generators that yield after every delivered result, so ``stream`` can
report tokens as they are committed. Whatever happens -- a backend error, the caller
abandoning the stream -- every handle the machine still holds is closed and every
worker thread is joined before the generator finishes.
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from ._errors import InternalError
from ._events import Fork, Lane, Open, Request, cost_of, perform
from ._machine import Machine
from ._protocol import Model

__all__ = ["DRIVERS", "run_driver"]

log = logging.getLogger("ssd_core")

DRIVERS = ("sequential", "threaded", "simulated")


def _close_quietly(model: Model, lane: Lane, handles: Any) -> None:
    for h in handles:
        try:
            model.close(h)
        except Exception as exc:  # already closed, or the backend is broken: say so
            log.warning("closing %s handle %r after an aborted run failed: %r", lane.value, h, exc)


def _release(machine: Machine, models: dict[Lane, Model]) -> None:
    """Close every handle the machine still holds (after a failure or an early stop)."""
    for lane, handles in machine.live_handles().items():
        if lane in models:
            _close_quietly(models[lane], lane, handles)


def _sequential(machine: Machine, models: dict[Lane, Model], clock: list[float]) -> Iterator[None]:
    start = time.perf_counter()
    while not machine.done:
        for lane in (Lane.DRAFT, Lane.TARGET):
            req = machine.next_request(lane)
            if req is not None:
                t0 = time.perf_counter()
                result = perform(models[lane], req)
                machine.deliver(req, result, time.perf_counter() - t0)
                clock[0] = time.perf_counter() - start
                yield
                break
        else:
            raise InternalError(f"the machine is stuck in {machine.phase} with nothing to do")
    clock[0] = time.perf_counter() - start


def _simulated(machine: Machine, models: dict[Lane, Model], clock: list[float]) -> Iterator[None]:
    now = 0.0
    free_at = {Lane.DRAFT: 0.0, Lane.TARGET: 0.0}
    pending: list[tuple[float, int, Lane, Request, Any, float]] = []
    busy: set[Lane] = set()
    order = 0
    while not machine.done:
        for lane in (Lane.DRAFT, Lane.TARGET):
            if lane in busy:
                continue
            req = machine.next_request(lane)
            if req is None:
                continue
            t0 = time.perf_counter()
            result = perform(models[lane], req)
            measured = time.perf_counter() - t0
            modelled = cost_of(models[lane], req)
            cost = measured if modelled is None else modelled
            finish = max(now, free_at[lane]) + cost
            free_at[lane] = finish
            heapq.heappush(pending, (finish, order, lane, req, result, cost))
            order += 1
            busy.add(lane)
        if not pending:
            raise InternalError(f"the machine is stuck in {machine.phase} with nothing to do")
        finish, _, lane, req, result, cost = heapq.heappop(pending)
        now = finish
        busy.discard(lane)
        machine.deliver(req, result, cost)
        clock[0] = now
        yield


class _Worker:
    """One lane's thread: performs requests in order, posts results to ``done``."""

    def __init__(self, lane: Lane, model: Model, done: queue.SimpleQueue[Any]) -> None:
        self.lane = lane
        self.model = model
        self.inbox: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self.done = done
        self.thread = threading.Thread(target=self._loop, name=f"ssd-{lane.value}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            req = self.inbox.get()
            if req is None:
                return
            t0 = time.perf_counter()
            try:
                result = perform(self.model, req)
            except BaseException as exc:
                self.done.put((self.lane, req, None, exc, time.perf_counter() - t0))
            else:
                self.done.put((self.lane, req, result, None, time.perf_counter() - t0))

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join()


def _threaded(machine: Machine, models: dict[Lane, Model], clock: list[float]) -> Iterator[None]:
    done: queue.SimpleQueue[Any] = queue.SimpleQueue()
    workers = {lane: _Worker(lane, model, done) for lane, model in models.items()}
    in_flight: set[Lane] = set()
    start = time.perf_counter()
    try:
        while not machine.done:
            for lane in workers:
                if lane in in_flight:
                    continue
                req = machine.next_request(lane)
                if req is not None:
                    workers[lane].inbox.put(req)
                    in_flight.add(lane)
            if not in_flight:
                raise InternalError(f"the machine is stuck in {machine.phase} with nothing to do")
            lane, req, result, exc, elapsed = done.get()
            in_flight.discard(lane)
            if exc is not None:
                raise exc
            machine.deliver(req, result, elapsed)
            clock[0] = time.perf_counter() - start
            yield
    finally:
        # Let requests still running finish before anyone touches the models again;
        # handles they created are unknown to the machine, so close them here.
        while in_flight:
            lane, req, result, exc, _ = done.get()
            in_flight.discard(lane)
            if exc is None and isinstance(req, (Fork, Open)):
                _close_quietly(models[lane], lane, result)
        for w in workers.values():
            w.stop()
    clock[0] = time.perf_counter() - start


_RUNNERS = {"sequential": _sequential, "threaded": _threaded, "simulated": _simulated}


def run_driver(
    name: str, machine: Machine, models: dict[Lane, Model], clock: list[float]
) -> Iterator[None]:
    """Drive ``machine`` to completion with the driver called ``name``.

    Yields after each delivered result. ``clock[0]`` holds the elapsed (or virtual)
    time. On any exit other than completion -- an exception, or the consumer closing
    the generator -- the machine is failed and every handle it holds is closed.
    """
    completed = False
    try:
        yield from _RUNNERS[name](machine, models, clock)
        completed = True
    except BaseException as exc:
        machine.fail(exc)
        raise
    finally:
        if not completed:
            if machine.error is None:
                machine.fail(GeneratorExit("the run was stopped early"))
            _release(machine, models)
