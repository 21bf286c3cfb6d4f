"""Ctrl-C while a backend call blocks (issue 11, D3): ``ssd_core`` never swallows the
KeyboardInterrupt, gives control back within a second, and never closes a handle under
the call that is still running; the engine's thread releases everything once it returns.

The interrupt is simulated with ``_thread.interrupt_main()`` from a timer thread, fired
while a :class:`~tests.reliability.doubles.Probe` call blocks on an Event.
"""

from __future__ import annotations

import _thread
import threading
import time

import pytest

from ssd_core import Engine, SamplingParams, SSDConfig, generate, stream

from .doubles import Probe, engine_threads, every, models, wait_until

DRIVERS = ("sequential", "threaded", "simulated")
CFG = SSDConfig(k=3, fanout=4)
T1 = SamplingParams(temperature=1.0)
#: The bound the issue sets: control back within 1 s of the interrupt.
LIMIT_S = 1.0


_STOP = threading.Event()


@pytest.fixture(autouse=True)
def _no_late_interrupt():
    """An interrupter never fires after its test ended."""
    _STOP.clear()
    yield
    _STOP.set()


def _interrupt_when(probe: Probe, armed: threading.Event | None = None) -> list[float]:
    """Interrupt the main thread as soon as ``probe`` blocks in a call (and ``armed``
    is set, then a moment later); the returned list gets the time of the interrupt."""
    fired: list[float] = []

    def fire() -> None:
        while not probe.hanging.wait(0.05):
            if _STOP.is_set():
                return
        if armed is not None:
            armed.wait(20)
            time.sleep(0.2)  # let the main thread get into the call it is armed for
        if not _STOP.is_set():
            fired.append(time.monotonic())
            _thread.interrupt_main()

    threading.Thread(target=fire, name="test-interrupter", daemon=True).start()
    return fired


def _probes(lane: str) -> tuple[Probe, Probe, Probe]:
    t, d = models()
    stuck = every("extend", "hang", at=[4])
    target = Probe(t, plan=stuck if lane == "target" else None)
    draft = Probe(d, plan=stuck if lane == "draft" else None)
    return target, draft, target if lane == "target" else draft


def _after(target: Probe, draft: Probe, blocked: Probe, fired: list[float], caught: float):
    """Control came back promptly, while the call still blocks and with nothing closed
    under it; once it returns, the engine releases every handle and thread."""
    assert fired, "the backend call never blocked"
    print(f"control back {caught - fired[0]:.3f} s after the interrupt")
    assert caught - fired[0] < LIMIT_S, f"control came back after {caught - fired[0]:.2f} s"
    assert blocked.hanging.is_set(), "the call was not still running"
    assert blocked.closed_during_call == 0
    assert engine_threads(), "the engine thread must still be waiting for the call"
    blocked.release.set()
    assert wait_until(lambda: not engine_threads()), f"threads left: {engine_threads()}"
    for p in (target, draft):
        assert p.closed_during_call == 0
        assert p.open_handles == 0, f"{p.name}: {p.open_handles} handles left"
        assert p.double_closes == []


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("lane", ["target", "draft"])
def test_ctrl_c_in_generate(driver: str, lane: str) -> None:
    target, draft, blocked = _probes(lane)
    fired = _interrupt_when(blocked)
    with pytest.raises(KeyboardInterrupt):
        generate(
            target,
            draft,
            prompts=[[1, 2], [3]],
            max_new_tokens=200,
            sampling=T1,
            config=CFG,
            driver=driver,
        )
    _after(target, draft, blocked, fired, time.monotonic())


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("lane", ["target", "draft"])
def test_ctrl_c_while_iterating_a_stream(driver: str, lane: str) -> None:
    target, draft, blocked = _probes(lane)
    s = stream(
        target,
        draft,
        prompts=[[1, 2], [3]],
        max_new_tokens=200,
        sampling=T1,
        config=CFG,
        driver=driver,
    )
    armed = threading.Event()  # not before the loop: stream() starts the run at once
    fired = _interrupt_when(blocked, armed)
    got: dict[int, list[int]] = {0: [], 1: []}
    with pytest.raises(KeyboardInterrupt):
        armed.set()
        for ev in s:
            got[ev.index].extend(ev.tokens)
    caught = time.monotonic()
    _after(target, draft, blocked, fired, caught)
    # What the stream showed is what it committed; it ended as cancelled, not running.
    res = s.result()
    for i in (0, 1):
        assert res.tokens[i][: len(got[i])] == got[i]
    assert res.finish_reasons == ["cancelled", "cancelled"]


@pytest.mark.parametrize("lane", ["target", "draft"])
def test_ctrl_c_in_an_engine_block(lane: str) -> None:
    """``with Engine(...)``: the interrupt leaves the block promptly too (``__exit__``
    does not wait for the stuck call)."""
    target, draft, blocked = _probes(lane)
    fired = _interrupt_when(blocked)
    with pytest.raises(KeyboardInterrupt), Engine(target, draft, config=CFG) as engine:
        engine.submit([1, 2], sampling=T1, max_new_tokens=200, seed=0).result()
    _after(target, draft, blocked, fired, time.monotonic())


def test_ctrl_c_in_engine_close_is_not_held_up() -> None:
    """``Engine.close()`` (no timeout) waits for a stuck call, but in slices: a Ctrl-C
    during that wait gets through."""
    target, draft, blocked = _probes("target")
    engine = Engine(target, draft, config=CFG)
    engine.submit([1, 2], sampling=T1, max_new_tokens=200, seed=0)
    armed = threading.Event()
    fired = _interrupt_when(blocked, armed)
    assert blocked.hanging.wait(20)
    with pytest.raises(KeyboardInterrupt):
        armed.set()
        engine.close()
    _after(target, draft, blocked, fired, time.monotonic())
