"""One llama.cpp model called from several threads (issue 11, D1).

Every public method of ``LlamaCppModel`` takes the model's lock, so concurrent callers
are serialised: two threads generating on one model, or one model serving as both the
target and the draft under the threaded driver, give the sequential results. Without
the lock these runs corrupted logits (wrong greedy tokens, NaN) or crashed llama.cpp.
The fast tier repeats each case a few times; ``-m slow`` repeats it 100 times.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from backends.llama_cpp import LlamaCppModel, from_gguf
from ssd_core import SamplingParams, SSDConfig, generate

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = [[1, 17, 300, 301, 302], [1, 5, 6, 7, 5, 6], [1, 250], [1, 40, 41, 42, 43, 44, 45]]

REPEATS = [pytest.param(3, id="x3"), pytest.param(100, id="x100", marks=pytest.mark.slow)]


@pytest.fixture
def shared(tiny_gguf: Path) -> Iterator[LlamaCppModel]:
    # Room for the target's handles and SSD's draft tree on the same model.
    model = from_gguf(tiny_gguf, n_threads=1, n_ctx=256, n_seq_max=64)
    yield model
    model.free()


def in_threads(*jobs: Callable[[], object]) -> list[object]:
    """Run ``jobs`` at once (released together by a barrier); re-raise the first error."""
    barrier = threading.Barrier(len(jobs))
    results: list[object] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i: int, job: Callable[[], object]) -> None:
        barrier.wait()
        try:
            results[i] = job()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def ar(model: LlamaCppModel, prompts: list[list[int]]) -> list[list[int]]:
    return generate(
        model, None, prompts=prompts, mode="ar", max_new_tokens=24, sampling=GREEDY, seed=0
    ).tokens


@pytest.mark.parametrize("repeats", REPEATS)
def test_two_threads_generating_on_one_model(shared: LlamaCppModel, repeats: int) -> None:
    expected_a, expected_b = ar(shared, PROMPTS[:2]), ar(shared, PROMPTS[2:])
    for _ in range(repeats):
        got_a, got_b = in_threads(lambda: ar(shared, PROMPTS[:2]), lambda: ar(shared, PROMPTS[2:]))
        assert got_a == expected_a and got_b == expected_b
    assert shared.open_handles == 0 and shared.free_slots == shared.slots


@pytest.mark.parametrize("repeats", REPEATS)
def test_two_threads_extending_one_model(tiny: LlamaCppModel, repeats: int) -> None:
    def logits_of(tokens: list[int]) -> np.ndarray:
        h = tiny.open(tokens[:2])
        rows = [tiny.extend([(h, [t])])[0] for t in tokens[2:]]
        h2 = tiny.fork(h, 3)
        rows.append(tiny.extend([(h2, tokens[:1])])[0])
        tiny.close(h2)
        tiny.truncate(h, 2)
        rows.append(tiny.extend([(h, tokens[2:])])[-1])
        tiny.close(h)
        return np.stack(rows)

    a, b = PROMPTS[0] + [9, 10, 11], PROMPTS[3]
    expected = (logits_of(a), logits_of(b))
    for _ in range(repeats):
        got = in_threads(lambda: logits_of(a), lambda: logits_of(b))
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    assert tiny.open_handles == 0 and tiny.free_slots == tiny.slots


@pytest.mark.parametrize("repeats", REPEATS)
@pytest.mark.parametrize("mode", ["sd", "ssd"])
def test_one_model_as_target_and_draft(shared: LlamaCppModel, mode: str, repeats: int) -> None:
    # The threaded driver calls the draft lane and the target lane from two threads at
    # once; here both lanes are the same model object.
    expected = ar(shared, PROMPTS[:2])
    for _ in range(repeats):
        for driver in ("threaded", "sequential"):
            # adaptive=False: a draft as costly as the target never pays, so the
            # speculation policy would (rightly) not draft at all.
            res = generate(
                shared, shared, prompts=PROMPTS[:2], mode=mode, max_new_tokens=24,
                sampling=GREEDY, config=SSDConfig(k=4, adaptive=False), driver=driver, seed=0,
            )  # fmt: skip
            assert res.tokens == expected, (mode, driver)
            assert res.metrics.accepted_tokens > 0  # the draft is the target: it agrees
    assert shared.open_handles == 0 and shared.free_slots == shared.slots


def test_free_waits_for_a_running_call(tiny_gguf: Path) -> None:
    # free() from another thread takes the lock, so it never frees the context under a
    # running decode; later calls get a HandleError instead of a crash.
    from ssd_core import HandleError

    model = from_gguf(tiny_gguf, n_threads=1, n_ctx=256)
    h = model.open([1, 2, 3])
    with model._lock:  # hold the model as a running call would
        t = threading.Thread(target=model.free)
        t.start()
        t.join(timeout=0.2)
        assert t.is_alive() and not model.freed  # free() is waiting
        assert model.extend([(h, [4])]).shape == (1, 324)
    t.join(timeout=10)
    assert model.freed
    with pytest.raises(HandleError):
        model.extend([(h, [5])])
    with pytest.raises(HandleError):
        model.tokenizer.encode("the")  # the tokenizer borrowed the freed vocabulary
