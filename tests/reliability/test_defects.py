"""One test (or family) per engine defect of issue 11 (D1-D3, D6, D8-D11, D14).

D4, D5 (llama.cpp resource limits, chat templates), D7 (CLI output paths) and D12,
D13 (conformance temp file, per-check timeout) belong to the backend, CLI and
conformance suites. Every model here is a :class:`~tests.reliability.doubles.Probe`
around a reference model, so each test also checks that no call overlapped another on
one model, that no handle was closed twice or under a running call, and that no handle
or engine thread is left at the end.
"""

from __future__ import annotations

import contextlib
import gc
import threading

import numpy as np
import pytest

from backends.reference import ReferenceModel
from ssd_core import (
    BackendContractError,
    ConfigError,
    Engine,
    GenerationError,
    InputError,
    LaneTimeoutError,
    SamplingParams,
    SSDConfig,
    SSDError,
    generate,
    stream,
)

from .doubles import InjectedFault, Probe, engine_threads, every, models, wait_until

DRIVERS = ("sequential", "threaded", "simulated")
CFG = SSDConfig(k=3, fanout=4)
T1 = SamplingParams(temperature=1.0)


_BEFORE: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def _engine_threads_before():
    """Engine threads an earlier test left behind are not this test's."""
    _BEFORE.clear()
    _BEFORE.update(engine_threads())


def _new_threads() -> list[threading.Thread]:
    return [t for t in engine_threads() if t not in _BEFORE]


def _clean(*probes: Probe) -> None:
    """No engine thread left, every handle closed exactly once and never under a call,
    no two calls overlapped on one model."""
    assert wait_until(lambda: not _new_threads()), f"threads left: {_new_threads()}"
    for p in probes:
        assert p.open_handles == 0, f"{p.name}: {p.open_handles} handles left"
        assert p.double_closes == [], f"{p.name}: closed twice: {p.double_closes}"
        assert p.closed_during_call == 0, f"{p.name}: a handle was closed under a call"
        assert p.overlaps == 0, f"{p.name}: two calls overlapped"


# -- D1: one model shared -----------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("mode", ["sd", "ssd"])
def test_d1_one_model_as_target_and_draft(driver: str, mode: str) -> None:
    """The same object on both lanes: called one call at a time, and the tokens are the
    ones a separate, identical draft gives (a request's tokens depend only on logits
    and draws)."""
    target, _ = models(vocab=24, seed=3)
    twin = ReferenceModel(target._raw_fn, vocab_size=24, order=2, name="twin")
    shared = Probe(target)
    kw = dict(
        prompts=[[1, 2], [3], [4, 5, 6]],
        mode=mode,
        max_new_tokens=25,
        sampling=T1,
        config=CFG,
        driver=driver,
        seed=11,
    )
    got = generate(shared, shared, **kw)
    want = generate(target, twin, **kw)
    assert got.tokens == want.tokens
    assert got.metrics.accepted_per_proposed == 1.0
    _clean(shared)


@pytest.mark.parametrize("driver", DRIVERS)
def test_d1_threads_calling_generate_on_one_model(driver: str) -> None:
    """Four threads, each its own generate, one model on every lane of every engine."""
    target, _ = models(vocab=24, seed=4)
    shared = Probe(target)
    results: dict[int, list[list[int]]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = generate(
                shared,
                shared,
                prompts=[[i + 1], [i + 2, 3]],
                mode="ssd",
                max_new_tokens=30,
                sampling=T1,
                config=CFG,
                driver=driver,
                seed=i,
            ).tokens
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _clean(shared)
    for i in range(4):
        alone = generate(
            target,
            target,
            prompts=[[i + 1], [i + 2, 3]],
            mode="ssd",
            max_new_tokens=30,
            sampling=T1,
            config=CFG,
            seed=i,
        )
        assert results[i] == alone.tokens


# -- D2: a batch that fails part-way ------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize(
    ("lane", "method", "at"),
    [
        ("target", "open", 1),  # the first handle of the first batch
        ("target", "open", 2),  # the second: the first is already made
        ("draft", "open", 2),
        ("draft", "fork", 2),  # part-way through the first tree's forks
        ("draft", "fork", 7),
    ],
)
@pytest.mark.parametrize("on_draft_error", ["raise", "degrade"])
def test_d2_a_failed_batch_leaves_no_handle(driver, lane, method, at, on_draft_error):
    """Whatever lane fails, and wherever in a batch: no handle is left on either model
    (the other lane's finished work is drained and closed too), none closed twice."""
    t, d = models()
    target = Probe(t, plan=every(method, "raise", at=[at]) if lane == "target" else None)
    draft = Probe(d, plan=every(method, "raise", at=[at]) if lane == "draft" else None)
    kw = dict(
        prompts=[[1, 2], [3], [4, 5, 6]],
        mode="ssd",
        max_new_tokens=30,
        sampling=T1,
        config=CFG,
        driver=driver,
        on_draft_error=on_draft_error,
    )
    if lane == "draft" and on_draft_error == "degrade":
        out = generate(target, draft, **kw)
        assert out.metrics.draft_faults == 1 and [len(x) for x in out.tokens] == [30] * 3
    else:
        with pytest.raises(GenerationError) as info:
            generate(target, draft, **kw)
        assert isinstance(info.value.__cause__, InjectedFault)
    assert (target.faults if lane == "target" else draft.faults)["raise"] == 1
    _clean(target, draft)


# -- D3: a stuck backend ------------------------------------------------------------------


def _tokens_without_faults(prompts, n, seed, mode="ssd"):
    t, d = models()
    return generate(
        t, d, prompts=prompts, mode=mode, max_new_tokens=n, sampling=T1, config=CFG, seed=seed
    ).tokens


def test_d3_a_stuck_target_times_out_with_the_tokens_so_far() -> None:
    t, d = models()
    target = Probe(t, plan=every("extend", "hang", at=[4]))
    draft = Probe(d)
    engine = Engine(target, draft, mode="ssd", config=CFG, target_timeout=0.2)
    h = engine.submit([1, 2], sampling=T1, max_new_tokens=40, seed=5)
    with pytest.raises(LaneTimeoutError) as info:
        h.result()
    assert target.hanging.is_set()  # raised while the call is still stuck
    partial = info.value.partial
    assert 0 < len(partial.tokens) < 40
    want = _tokens_without_faults([[1, 2]], 40, seed=5)[0]
    assert list(partial.tokens) == want[: len(partial.tokens)]
    engine.close()
    # Nothing was closed under the stuck call; once it returns, everything is released.
    assert target.closed_during_call == 0
    target.release.set()
    _clean(target, draft)


def test_d3_a_stuck_draft_is_abandoned_and_the_run_degrades() -> None:
    t, d = models()
    target = Probe(t)
    draft = Probe(d, plan=every("extend", "hang", at=[5]))
    with Engine(target, draft, mode="ssd", config=CFG, draft_timeout=0.2) as engine:
        h = engine.submit([1, 2], sampling=T1, max_new_tokens=40, seed=5)
        res = h.result()
        assert draft.hanging.is_set()  # finished while the draft is still stuck
        assert len(res.tokens) == 40 and res.finish_reason == "length"
        assert engine.metrics().draft_faults == 1
    assert target.open_handles == 0
    draft.release.set()
    _clean(target, draft)


def test_d3_a_stuck_shared_model_fails_with_a_timeout_not_a_stall() -> None:
    """Draft and target are one model: a stuck draft call is a stuck target too, so
    there is nothing to degrade to -- a LaneTimeoutError, at once."""
    t, _ = models()
    shared = Probe(t, plan=every("fork", "hang", at=[2]))
    with Engine(shared, shared, mode="ssd", config=CFG, draft_timeout=0.2) as engine:
        h = engine.submit([1, 2], sampling=T1, max_new_tokens=40, seed=5)
        with pytest.raises(LaneTimeoutError) as info:
            h.result()
        assert shared.hanging.is_set()
        assert "draft" in str(info.value) and "target" in str(info.value)
    shared.release.set()
    _clean(shared)


@pytest.mark.parametrize("driver", ["sequential", "simulated"])
def test_d3_timeouts_need_the_threaded_driver(driver: str) -> None:
    t, d = models()
    for kw in ({"draft_timeout": 1.0}, {"target_timeout": 1.0}):
        with pytest.raises(ConfigError, match="threaded"):
            Engine(t, d, mode="ssd", driver=driver, **kw)


def test_d3_generate_takes_lane_timeouts() -> None:
    t, d = models()
    target = Probe(t, plan=every("extend", "hang", at=[3]))
    with pytest.raises(LaneTimeoutError):
        generate(target, d, prompts=[[1]], max_new_tokens=30, driver="threaded", target_timeout=0.2)
    target.release.set()
    _clean(target)


# -- D6: stream raises typed errors --------------------------------------------------------


class _BadTokenizer:
    eos_token_ids = ()

    def __init__(self, fail_after: int) -> None:
        self.fail_after = fail_after

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [1]

    def decode(self, tokens):
        if len(tokens) > self.fail_after:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return "x" * len(tokens)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("fault", ["target", "draft", "tokenizer"])
def test_d6_stream_raises_a_typed_generation_error(driver: str, fault: str) -> None:
    t, d = models()
    target = Probe(t, plan=every("extend", "raise", at=[4]) if fault == "target" else None)
    draft = Probe(d, plan=every("extend", "raise", at=[4]) if fault == "draft" else None)
    if fault == "tokenizer":
        target.tokenizer = _BadTokenizer(fail_after=5)
    s = stream(
        target,
        draft,
        prompts=[[1, 2]],
        max_new_tokens=40,
        sampling=T1,
        config=CFG,
        driver=driver,
        on_draft_error="raise",
    )
    seen: list[int] = []
    with pytest.raises(GenerationError) as info:
        for ev in s:
            seen.extend(ev.tokens)
    cause = info.value.__cause__
    assert isinstance(cause, UnicodeDecodeError if fault == "tokenizer" else InjectedFault)
    assert info.value.partial.tokens[0][: len(seen)] == seen
    _clean(target, draft)


# -- D8: cancel from another thread; abandoned streams -------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_d8_cancel_a_running_stream_from_another_thread(driver: str) -> None:
    t, d = models()
    target, draft = Probe(t), Probe(d)
    s = stream(
        target,
        draft,
        prompts=[[1], [2, 3]],
        max_new_tokens=100_000,
        sampling=T1,
        config=CFG,
        driver=driver,
    )
    n = 0
    for ev in s:
        n += len(ev.tokens)
        if n >= 10 and n < 1000:
            threading.Thread(target=s.cancel).start()
            n = 1000
    res = s.result()
    assert res.finish_reasons == ["cancelled", "cancelled"]
    assert 0 < sum(map(len, res.tokens)) < 200_000
    _clean(target, draft)


@pytest.mark.parametrize("driver", DRIVERS)
def test_d8_cancel_a_running_request_from_another_thread(driver: str) -> None:
    t, d = models()
    target, draft = Probe(t), Probe(d)
    with Engine(target, draft, mode="ssd", config=CFG, driver=driver) as engine:
        h = engine.submit([1, 2], sampling=T1, max_new_tokens=100_000, seed=1)
        next(iter(h))
        threading.Thread(target=h.cancel).start()
        res = h.result()
        assert res.finish_reason == "cancelled" and len(res.tokens) < 100_000
        assert wait_until(lambda: target.open_handles == 0 and draft.open_handles == 0)
    _clean(target, draft)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("how", ["dropped", "break"])
def test_d8_an_abandoned_stream_releases_handles_and_threads(driver: str, how: str) -> None:
    t, d = models()
    target, draft = Probe(t), Probe(d)

    def consume() -> None:
        s = stream(
            target,
            draft,
            prompts=[[1], [2, 3]],
            max_new_tokens=100_000,
            sampling=T1,
            config=CFG,
            driver=driver,
        )
        if how == "dropped":
            next(s)
            next(s)
        else:
            for _ in s:
                break

    consume()
    gc.collect()
    _clean(target, draft)


# -- D9: prompts and contexts --------------------------------------------------------------


@pytest.mark.parametrize("extra", [1, 2])
def test_d9_a_prompt_beyond_the_context_is_refused_up_front(extra: int) -> None:
    t, d = models(context=8)
    target, draft = Probe(t), Probe(d)
    with pytest.raises(InputError, match=r"prompt 0 has \d+ tokens.*context holds 8"):
        generate(target, draft, prompts=[[1] * (8 + extra)], max_new_tokens=4)
    assert sum(target.calls.values()) == 0 and sum(draft.calls.values()) == 0


def test_d9_a_prompt_that_fills_the_context_gets_one_token() -> None:
    t, d = models(context=8)
    out = generate(t, d, prompts=[[1] * 8], max_new_tokens=4)
    assert [len(x) for x in out.tokens] == [1] and out.finish_reasons == ["length"]


def test_d9_one_long_prompt_sinks_a_generate_call_but_only_its_own_submit() -> None:
    t, d = models(context=8)
    target, draft = Probe(t), Probe(d)
    with pytest.raises(InputError, match="prompt 1 "):
        generate(target, draft, prompts=[[1, 2], [1] * 9, [3]], max_new_tokens=4)
    assert sum(target.calls.values()) == 0
    with Engine(target, draft, mode="ssd", config=CFG) as engine:
        ok = engine.submit([1, 2], max_new_tokens=4, seed=0)
        with pytest.raises(InputError, match="prompt 0 has 9 tokens"):
            engine.submit([1] * 9, max_new_tokens=4, seed=1)
        also_ok = engine.submit([3], max_new_tokens=4, seed=2)
        assert len(ok.result().tokens) == 4 and len(also_ok.result().tokens) == 4
    _clean(target, draft)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("mode", ["sd", "ssd"])
def test_d9_a_prompt_the_draft_cannot_hold_runs_target_only(driver: str, mode: str) -> None:
    """Draft context 6, target context 64: the 8-token prompt takes plain target steps
    (exactly AR's tokens for its seed), its neighbour still speculates."""
    t, d = models(context=64, draft_context=6)
    target, draft = Probe(t), Probe(d)
    long, short = [1, 2, 3, 4, 5, 6, 7, 8], [2]
    out = generate(
        target,
        draft,
        prompts=[long, short],
        mode=mode,
        max_new_tokens=20,
        sampling=T1,
        config=CFG,
        driver=driver,
        seed=3,
    )
    ar = generate(t, None, prompts=[long, short], mode="ar", max_new_tokens=20, sampling=T1, seed=3)
    assert out.tokens[0] == ar.tokens[0]
    assert len(out.tokens[1]) == 20 and out.metrics.proposed_tokens > 0
    _clean(target, draft)


# -- D10: no silent coercion ---------------------------------------------------------------


def _ref(**kw):
    return ReferenceModel.random(vocab_size=16, order=2, seed=1, **kw)


COERCIONS = {
    "seed=1.7": (lambda t: generate(t, None, prompts=[[1]], mode="ar", seed=1.7), "1.7"),
    "seed=2**64": (lambda t: generate(t, None, prompts=[[1]], mode="ar", seed=2**64), str(2**64)),
    "seed='abc'": (lambda t: generate(t, None, prompts=[[1]], mode="ar", seed="abc"), "'abc'"),
    "submit seed=1.7": (lambda t: Engine(t, mode="ar").submit([1], seed=1.7), "1.7"),
    "stop_token_ids='12'": (lambda t: SamplingParams(stop_token_ids="12"), "'12'"),
    "ignore_eos='no'": (lambda t: SamplingParams(ignore_eos="no"), "'no'"),
    "fanout=1.7": (lambda t: SSDConfig(fanout=1.7), "1.7"),
    "fanout='12'": (lambda t: SSDConfig(fanout="12"), "'12'"),
    "fanout_after_backup='12'": (lambda t: SSDConfig(fanout_after_backup="12"), "'12'"),
    "rank_window=None": (lambda t: SSDConfig(rank_window=None), "None"),
    "k='3'": (lambda t: SSDConfig(k="3"), "'3'"),
    "temperature='1'": (lambda t: SamplingParams(temperature="1"), "'1'"),
    "max_new_tokens=1.5": (
        lambda t: generate(t, None, prompts=[[1]], mode="ar", max_new_tokens=1.5),
        "1.5",
    ),
    "prompt token 1.0": (lambda t: generate(t, None, prompts=[[1.0]], mode="ar"), "1.0"),
    "context_size='8'": (
        lambda t: generate(_ref(context_size="8"), None, prompts=[[1]], mode="ar"),
        "'8'",
    ),
    "target_timeout='1'": (lambda t: Engine(t, mode="ar", target_timeout="1"), "'1'"),
    "max_batch=True": (lambda t: Engine(t, mode="ar", max_batch=True), "True"),
}


@pytest.mark.parametrize("case", sorted(COERCIONS))
def test_d10_no_silent_coercion(case: str) -> None:
    build, shown = COERCIONS[case]
    target = Probe(_ref())
    with pytest.raises(SSDError) as info:
        build(target)
    assert isinstance(info.value, (ConfigError, InputError))
    assert shown in str(info.value)
    assert sum(target.calls.values()) == 0


# -- D11: K beyond what a sequence can still commit ----------------------------------------


@pytest.mark.parametrize("mode", ["sd", "ssd"])
def test_d11_a_huge_k_does_the_work_of_the_budget(mode: str) -> None:
    """k=10000 for 12 tokens drafts exactly what k=12 does (a speculation never exceeds
    what the sequence can still commit): same tokens, same draft calls and rows."""
    runs = []
    for k in (12, 10_000):
        t, d = models()
        target, draft = Probe(t), Probe(d)
        fan = 4 if mode == "ssd" else 12
        out = generate(
            target,
            draft,
            prompts=[[1, 2]],
            mode=mode,
            max_new_tokens=12,
            sampling=T1,
            config=SSDConfig(k=k, fanout=fan),
            seed=2,
        )
        runs.append((out.tokens, dict(draft.calls), draft.extend_rows, target.extend_rows))
    assert runs[0] == runs[1]
    assert runs[1][2] <= 12 * 13  # never more draft rows than a K = 12 run could score


# -- D14: double closes, array types -------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize(
    ("lane", "method", "action", "at"),
    [
        ("target", "extend", "raise", 3),
        ("target", "extend", "nan", 5),
        ("draft", "extend", "raise", 4),
        ("draft", "extend", "nan", 6),
        ("draft", "fork", "raise", 3),
        ("draft", "close", "raise", 2),
        ("target", "close", "raise", 2),
    ],
)
def test_d14_cleanup_closes_every_handle_once(driver, lane, method, action, at) -> None:
    t, d = models()
    plan = every(method, action, at=[at])
    target = Probe(t, plan=plan if lane == "target" else None)
    draft = Probe(d, plan=plan if lane == "draft" else None)
    with contextlib.suppress(GenerationError):
        generate(
            target,
            draft,
            prompts=[[1, 2], [3], [4, 5]],
            mode="ssd",
            max_new_tokens=30,
            sampling=T1,
            config=CFG,
            driver=driver,
        )
    assert (target.faults if lane == "target" else draft.faults)[action] == 1
    assert target.double_closes == [] and draft.double_closes == []
    if method != "close":  # a close that raised may have left its handle behind
        _clean(target, draft)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("on_draft_error", ["raise", "degrade"])
@pytest.mark.parametrize("mode", ["sd", "ssd"])
def test_d14_a_draft_that_switches_array_type_is_a_contract_error(driver, on_draft_error, mode):
    pytest.importorskip("torch")
    t, d = models()
    target, draft = Probe(t), Probe(d, plan=every("extend", "torch", at=[3]))
    kw = dict(
        prompts=[[1, 2], [3]],
        mode=mode,
        max_new_tokens=30,
        sampling=T1,
        config=CFG,
        driver=driver,
        on_draft_error=on_draft_error,
    )
    if on_draft_error == "degrade":
        out = generate(target, draft, **kw)
        assert out.metrics.draft_faults == 1 and [len(x) for x in out.tokens] == [30, 30]
    else:
        with pytest.raises(GenerationError) as info:
            generate(target, draft, **kw)
        cause = info.value.__cause__
        assert isinstance(cause, BackendContractError), repr(cause)
        assert draft.name in str(cause) and "Tensor" in str(cause) and "ndarray" in str(cause)
    _clean(target, draft)


def test_d14_logits_of_one_type_throughout_are_fine() -> None:
    """The check compares a lane's logits with its own earlier ones, not with numpy."""
    pytest.importorskip("torch")
    t, d = models()
    draft = Probe(d, plan=lambda m, n: "torch" if m == "extend" else None)
    out = generate(t, draft, prompts=[[1, 2]], mode="ssd", max_new_tokens=20, config=CFG)
    assert out.metrics.draft_faults == 0 and len(out.tokens[0]) == 20
    assert np.isfinite(out.metrics.accepted_per_proposed)


# -- found by the fault-injection test: requests that never resolved -----------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_failure_also_fails_the_requests_waiting_for_a_slot(driver: str) -> None:
    """max_batch=1: the second request waits while the first fails; it must fail too
    (typed, nothing committed), not wait forever."""
    t, d = models()
    target = Probe(t, plan=every("extend", "raise", at=[3]))
    draft = Probe(d)
    with Engine(target, draft, mode="ssd", config=CFG, driver=driver, max_batch=1) as engine:
        first = engine.submit([1, 2], sampling=T1, max_new_tokens=40, seed=1)
        waiting = engine.submit([3], sampling=T1, max_new_tokens=40, seed=2)
        with pytest.raises(GenerationError):
            first.result(timeout=20)
        with pytest.raises(GenerationError) as info:
            waiting.result(timeout=20)
        assert info.value.partial.tokens == ()
        assert isinstance(info.value.__cause__, InjectedFault)
    _clean(target, draft)


def test_a_submit_racing_the_engine_shutdown_is_refused_or_resolved() -> None:
    """Submitting while the engine shuts down after a fault: every submit either raises
    EngineClosedError or returns a handle that resolves (before the fix a submit could
    slip into the queue after the engine's last drain and wait forever)."""
    t, d = models()
    for i in range(200):
        target = Probe(t, plan=every("extend", "raise", at=[1]))
        # max_batch=1: later submits wait for a slot, so the first request reaches its
        # round (and the fault) however fast they arrive.
        engine = Engine(target, d, mode="sd", config=CFG, driver="sequential", max_batch=1)
        handles = []
        while True:
            try:
                handles.append(engine.submit([1], max_new_tokens=5, seed=i))
            except SSDError:
                break
        for h in handles:
            with pytest.raises(SSDError):
                h.result(timeout=20)
        engine.close()
    assert wait_until(lambda: not _new_threads())
