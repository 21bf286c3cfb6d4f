"""A fault mid-run loses no committed token and leaves no handle or thread behind."""

from __future__ import annotations

import threading

import pytest

from ssd_core import (
    BackendContractError,
    GenerationError,
    SamplingParams,
    SSDConfig,
    generate,
    stream,
)

from .helpers import Faulty, pair


@pytest.mark.parametrize("driver", ["sequential", "threaded", "simulated"])
@pytest.mark.parametrize("who", ["target", "draft"])
def test_backend_exception_keeps_tokens_and_releases_everything(driver, who):
    t, d = pair(vocab=16, seed=1)
    target = Faulty(t, fail_at=6) if who == "target" else t
    draft = Faulty(d, fail_at=9) if who == "draft" else d
    before = threading.active_count()
    with pytest.raises(GenerationError) as info:
        generate(
            target,
            draft,
            prompts=[[1, 2], [3]],
            mode="ssd",
            max_new_tokens=50,
            config=SSDConfig(k=2, fanout=4, fallback="neural"),
            driver=driver,
            sampling=SamplingParams(temperature=1.0),
            on_draft_error="raise",
        )
    assert isinstance(info.value.__cause__, RuntimeError)
    partial = info.value.partial
    assert sum(len(x) for x in partial.tokens) > 0
    # The committed prefix is what an uninterrupted run with the same seed produces.
    full = generate(
        t,
        d,
        prompts=[[1, 2], [3]],
        mode="ssd",
        max_new_tokens=50,
        config=SSDConfig(k=2, fanout=4, fallback="neural"),
        driver=driver,
        sampling=SamplingParams(temperature=1.0),
    )
    for got, ref in zip(partial.tokens, full.tokens):
        assert ref[: len(got)] == got
    assert t.open_handles == 0 and d.open_handles == 0
    assert threading.active_count() == before


@pytest.mark.parametrize("driver", ["sequential", "threaded", "simulated"])
@pytest.mark.parametrize("nan", [False, True])
def test_a_failing_draft_degrades_to_target_steps(driver, nan):
    """on_draft_error="degrade" (the default): the run completes, no committed token is
    lost or changed, every handle and thread is released, and the fault is counted."""
    t, d = pair(vocab=16, seed=1)
    kw = dict(
        prompts=[[1, 2], [3]],
        mode="ssd",
        max_new_tokens=50,
        config=SSDConfig(k=2, fanout=4, fallback="neural"),
        driver=driver,
        sampling=SamplingParams(temperature=1.0),
    )
    before = threading.active_count()
    out = generate(t, Faulty(d, fail_at=9, nan=nan), **kw)
    assert out.metrics.draft_faults == 1
    assert [len(x) for x in out.tokens] == [50, 50]
    # What was committed before the fault (the partial of a run that raises there) is
    # kept as it was; target steps follow.
    with pytest.raises(GenerationError) as info:
        generate(t, Faulty(d, fail_at=9, nan=nan), on_draft_error="raise", **kw)
    for got, before_fault in zip(out.tokens, info.value.partial.tokens):
        assert got[: len(before_fault)] == before_fault
    assert t.open_handles == 0 and d.open_handles == 0
    assert threading.active_count() == before


def test_nan_logits_are_a_contract_error_naming_the_backend():
    t, d = pair(vocab=16, seed=1)
    bad = Faulty(t, fail_at=2, nan=True)
    with pytest.raises(GenerationError) as info:
        generate(bad, d, prompts=[[1]], mode="sd", max_new_tokens=20)
    cause = info.value.__cause__
    assert isinstance(cause, BackendContractError)
    assert "reference" in str(cause) and "verification" in str(cause)
    assert t.open_handles == 0 and d.open_handles == 0


def test_wrong_shape_is_a_contract_error():
    t, d = pair(vocab=16, seed=1)

    class Short(Faulty):
        def extend(self, requests):
            return super().extend(requests)[:, :-1]

    with pytest.raises(GenerationError) as info:
        generate(Short(t, fail_at=-1), d, prompts=[[1]], mode="ar", max_new_tokens=3)
    assert "shape" in str(info.value.__cause__)


@pytest.mark.parametrize("driver", ["sequential", "threaded"])
def test_abandoned_stream_releases_handles(driver):
    t, d = pair(vocab=16, seed=1)
    before = threading.active_count()
    s = stream(t, d, prompts=[[1], [2, 3]], mode="ssd", max_new_tokens=100, driver=driver)
    got = [next(s) for _ in range(3)]
    assert got
    s.close()
    assert t.open_handles == 0 and d.open_handles == 0
    assert threading.active_count() == before


def test_stream_events_add_up_to_the_result():
    t, d = pair(vocab=16, seed=1)
    s = stream(t, d, prompts=[[1], [2, 3]], mode="ssd", max_new_tokens=30)
    seen = {0: [], 1: []}
    for ev in s:
        seen[ev.index].extend(ev.tokens)
    assert [seen[0], seen[1]] == s.result().tokens
