"""The Engine: requests join and leave a running machine; a request's tokens depend only
on its own prompt, parameters and seed; cancel, asyncio, shared models."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from backends.reference import ReferenceModel
from ssd_core import (
    ConfigError,
    Engine,
    EngineClosedError,
    InputError,
    LatencyModel,
    SamplingParams,
    SSDConfig,
    generate,
)

from .helpers import Recording, pair

DRIVERS = ("sequential", "threaded", "simulated")
CONFIGS = {
    "fixed": SSDConfig(k=3, fanout=(2, 1, 1, 2), fallback="neural", saguaro_c=0.6),
    "budget": SSDConfig(k=4, fanout=8, fallback="neural", saguaro_c=0.8),
    "fast": SSDConfig(k=3, fanout=5, fallback="fast"),
    # C from each request's temperature: a batch mixes rows drafted with C = 0.85
    # (T = 0.5), C = 0.95 (T = 0.9) and C = 1 (T = 1.2).
    "default": SSDConfig(k=3),
}


def _others(i: int) -> list[int]:
    return [(7 * i + j) % 20 for j in range(1 + i % 4)]


def _staggered(engine: Engine, probe: list[int], params: SamplingParams, seed: int) -> list[int]:
    """Submit 7 other requests at staggered times and the probe in the middle of them;
    return the probe's tokens."""
    others = [
        engine.submit(
            _others(i),
            sampling=SamplingParams(temperature=0.9, top_k=8),
            max_new_tokens=12 + i,
            seed=100 + i,
        )
        for i in range(3)
    ]
    next(iter(others[0]))  # wait until the first round has committed something
    handle = engine.submit(probe, sampling=params, max_new_tokens=24, seed=seed)
    for i in range(3, 7):
        next(iter(others[i - 3]), None)
        others.append(
            engine.submit(
                _others(i),
                sampling=SamplingParams(temperature=1.2),
                max_new_tokens=10,
                seed=100 + i,
            )
        )
    tokens = list(handle.result().tokens)
    for o in others:
        o.result()
    return tokens


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("mode", ["sd", "ssd"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_a_request_does_not_depend_on_what_else_is_in_flight(driver, temperature, mode, config):
    target, draft = pair(vocab=20, seed=4, divergence=0.4)
    params = SamplingParams(temperature=temperature)
    probe, seed = [3, 1, 4], 77
    with Engine(target, draft, mode=mode, config=CONFIGS[config], driver=driver) as alone:
        solo = list(
            alone.submit(probe, sampling=params, max_new_tokens=24, seed=seed).result().tokens
        )
    with Engine(target, draft, mode=mode, config=CONFIGS[config], driver=driver) as busy:
        crowded = _staggered(busy, probe, params, seed)
    assert crowded == solo
    # generate() is the same request: prompt 0 of a one-prompt batch with that seed.
    ref = generate(
        target, draft, prompts=[probe], mode=mode, config=CONFIGS[config], sampling=params,
        max_new_tokens=24, seed=seed, driver=driver,
    )  # fmt: skip
    assert ref.tokens[0] == solo
    assert target.open_handles == 0 and draft.open_handles == 0


def test_requests_join_while_others_run_and_all_complete():
    lat = LatencyModel(per_call=0.002)
    target = ReferenceModel.random(vocab_size=32, order=2, seed=1, peakedness=2.0, latency=lat)
    draft = ReferenceModel.perturbed(target, divergence=0.3, latency=LatencyModel(per_call=0.0005))
    before = threading.active_count()
    with Engine(target, draft, mode="ssd", config=SSDConfig(k=3, fanout=6)) as engine:
        first = engine.submit([1, 2], max_new_tokens=40, seed=1)
        seen = []
        for ev in first:
            seen.append(ev)
            if len(seen) == 2:
                late = engine.submit([5], max_new_tokens=10, seed=2)
        assert late.result().finish_reason == "length" and len(late.result().tokens) == 10
        assert first.result().tokens == tuple(t for ev in seen for t in ev.tokens)
        m = engine.metrics()
    assert m.generated_tokens == 50 and m.batch_size == 2
    assert target.open_handles == 0 and draft.open_handles == 0
    assert threading.active_count() == before


@pytest.mark.parametrize("driver", DRIVERS)
def test_cancel_from_another_thread_frees_handles_within_a_round(driver):
    lat = LatencyModel(per_call=0.003)
    target = ReferenceModel.random(vocab_size=32, order=2, seed=1, latency=lat)
    draft = ReferenceModel.perturbed(target, divergence=0.3, latency=LatencyModel(per_call=0.001))
    with Engine(
        target, draft, mode="ssd", driver=driver, config=SSDConfig(k=3, fanout=6)
    ) as engine:
        keep = engine.submit([1, 2, 3], max_new_tokens=60, seed=3)
        doomed = engine.submit([4], max_new_tokens=10_000, seed=4)
        next(iter(doomed))
        threading.Thread(target=doomed.cancel).start()
        res = doomed.result(timeout=10)
        assert res.finish_reason == "cancelled"
        assert len(res.tokens) < 10_000
        assert keep.result().finish_reason == "length"
        # The cancelled request's handles are gone once the engine has gone round once.
        deadline = time.monotonic() + 5
        while target.open_handles or draft.open_handles:
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_asyncio_face_serves_many_requests_without_a_thread_each():
    target, draft = pair(vocab=24, seed=2)

    async def main() -> list[tuple[int, ...]]:
        with Engine(target, draft, mode="ssd", config=SSDConfig(k=3, fanout=4)) as engine:
            handles = [engine.submit([1], max_new_tokens=16, seed=0)]
            handles[0].result()  # the engine's thread and its lane workers are up
            before = set(threading.enumerate())
            handles += [engine.submit([i + 1], max_new_tokens=16, seed=i) for i in range(1, 8)]

            async def collect(h):
                out = []
                async for ev in h:
                    out.extend(ev.tokens)
                res = await h.wait()
                assert tuple(out) == res.tokens
                return res.tokens

            got = await asyncio.gather(*(collect(h) for h in handles))
            assert set(threading.enumerate()) - before == set()  # no thread per request
            return got

    got = asyncio.run(main())
    want = [generate(target, draft, prompts=[[i + 1]], max_new_tokens=16, seed=i,
                     config=SSDConfig(k=3, fanout=4)).tokens[0] for i in range(8)]  # fmt: skip
    assert [list(g) for g in got] == want


class OneThreadOnly(Recording):
    """A model that, like a llama.cpp context, must never be called from two threads at
    once: it fails loudly when it is."""

    def __init__(self, inner):
        super().__init__(inner)
        self._inside = 0
        self._guard = threading.Lock()

    def _enter(self):
        with self._guard:
            self._inside += 1
            if self._inside > 1:
                raise AssertionError("called from two threads at once")

    def _leave(self):
        with self._guard:
            self._inside -= 1

    def extend(self, requests):
        self._enter()
        try:
            time.sleep(0.001)
            return super().extend(requests)
        finally:
            self._leave()


@pytest.mark.parametrize("mode", ["sd", "ssd"])
def test_one_model_as_target_and_draft_under_threads(mode):
    """D1: the same model object on both lanes is called from one thread at a time,
    and greedy output is the AR output."""
    model = OneThreadOnly(ReferenceModel.random(vocab_size=16, order=2, seed=9, peakedness=2.0))
    greedy = SamplingParams(temperature=0.0)
    ar = generate(model, None, prompts=[[1, 2]], mode="ar", max_new_tokens=30, sampling=greedy)
    out = generate(model, model, prompts=[[1, 2]], mode=mode, max_new_tokens=30, sampling=greedy,
                   driver="threaded", config=SSDConfig(k=3, fanout=4))  # fmt: skip
    assert out.tokens == ar.tokens
    assert out.metrics.accepted_per_proposed == 1.0  # a draft that is the target


def test_two_threads_share_one_model_through_two_engines():
    model = OneThreadOnly(ReferenceModel.random(vocab_size=16, order=2, seed=9, peakedness=2.0))
    results: dict[int, list[list[int]]] = {}

    def run(i):
        results[i] = generate(model, None, prompts=[[i + 1]], mode="ar", max_new_tokens=40,
                              driver="threaded", seed=i).tokens  # fmt: skip

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        alone = generate(model, None, prompts=[[i + 1]], mode="ar", max_new_tokens=40, seed=i)
        assert results[i] == alone.tokens


def test_bad_input_is_refused_before_any_work_and_a_closed_engine_refuses_more():
    target, draft = pair(vocab=16, seed=1)
    rec_t, rec_d = Recording(target), Recording(draft)
    engine = Engine(rec_t, rec_d, mode="ssd")
    with pytest.raises(InputError, match="outside the vocabulary"):
        engine.submit([1, 99])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        engine.submit([1], max_new_tokens=-1)
    with pytest.raises(ConfigError, match="seed"):
        engine.submit([1], seed=-3)
    assert rec_t.calls == [] and rec_d.calls == []
    engine.submit([1], max_new_tokens=4, seed=0).result()
    engine.close()
    with pytest.raises(EngineClosedError):
        engine.submit([1])


def test_requests_beyond_max_batch_wait_their_turn():
    target, draft = pair(vocab=16, seed=1)
    with Engine(target, draft, mode="ssd", max_batch=2, config=SSDConfig(k=2, fanout=3)) as engine:
        handles = [engine.submit([i + 1], max_new_tokens=8, seed=i) for i in range(5)]
        for i, h in enumerate(handles):
            want = generate(target, draft, prompts=[[i + 1]], max_new_tokens=8, seed=i,
                            config=SSDConfig(k=2, fanout=3)).tokens[0]  # fmt: skip
            assert list(h.result().tokens) == want


def test_run_here_makes_every_call_in_the_callers_thread():
    target, draft = pair(vocab=20, seed=4, divergence=0.4)
    seen: set[int] = set()

    class Where(Recording):
        def extend(self, *a, **kw):
            seen.add(threading.get_ident())
            return super().extend(*a, **kw)

    engine = Engine(Where(target), Where(draft), config=SSDConfig(k=3, adaptive=False),
                    driver="sequential", own_thread=False)  # fmt: skip
    handles = engine.submit_many([[1, 2], [3]], max_new_tokens=12, seed=5)
    assert not any(h.done for h in handles)  # nothing runs until the caller says so
    engine.run_here()
    assert seen == {threading.get_ident()}
    threaded = generate(target, draft, prompts=[[1, 2], [3]], max_new_tokens=12, seed=5,
                        config=SSDConfig(k=3, adaptive=False))  # fmt: skip
    assert [list(h.result().tokens) for h in handles] == threaded.tokens
    with pytest.raises(Exception, match="own_thread"):
        engine.run_here()
    with pytest.raises(ConfigError, match="own_thread"):
        Engine(target, draft, driver="threaded", own_thread=False)
