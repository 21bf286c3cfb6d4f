"""The new conformance.stats helpers against brute force: the dynamic-programming law
of late tokens and lengths, the probability of one output, the mixed-batch sampler
and the draw-pairs test."""

from __future__ import annotations

import pytest

from backends.reference import ReferenceModel
from conformance.exact import target_distribution
from conformance.stats import (
    draw_pairs_test,
    exact_run_distribution,
    output_probability,
    run_statistic,
    sample_outputs,
)
from ssd_core import RandomStream, SamplingParams, SeededSource, SSDConfig

T = ReferenceModel.random(vocab_size=3, order=2, seed=5, peakedness=1.5)
PARAMS = {
    "plain": SamplingParams(),
    "stop-id": SamplingParams(stop_token_ids=(0,)),
    "top-p-stop-seq": SamplingParams(top_p=0.7, stop_sequences=((1, 2, 1),)),
    "all": SamplingParams(temperature=0.5, top_k=2, stop_token_ids=(2,), stop_sequences=((0, 0),)),
    "greedy": SamplingParams(temperature=0.0),
}
POSITIONS = [((4, 5, 6), False), ((0, 6), True), ((), True), ((2, 3), False), ((5, 9), True)]


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_run_distribution_matches_brute_force(name: str) -> None:
    params = PARAMS[name]
    full = target_distribution(T.logits, [1, 2], params, 7)
    for positions, with_length in POSITIONS:
        want: dict[object, float] = {}
        for toks, p in full.items():
            key = run_statistic(toks, positions, with_length=with_length)
            want[key] = want.get(key, 0.0) + p
        got = exact_run_distribution(
            T.logits, [1, 2], params, max_new=7, order=2, positions=positions,
            with_length=with_length,
        )  # fmt: skip
        assert set(got) == set(want)
        assert max(abs(got[k] - want[k]) for k in want) <= 1e-12


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_output_probability_matches_brute_force(name: str) -> None:
    params = PARAMS[name]
    full = target_distribution(T.logits, [2], params, 5)
    for toks, p in full.items():
        assert output_probability(T.logits, [2], params, toks, max_new=5) == pytest.approx(p)
    # Impossible: running on past a stop, or ending early without one.
    for toks in full:
        if len(toks) < 5:
            assert output_probability(T.logits, [2], params, toks + (1,), max_new=5) == 0.0
        elif not params.stop_token_ids or toks[-1] not in params.stop_token_ids:
            assert output_probability(T.logits, [2], params, toks[:-1], max_new=5) == 0.0


def test_sample_outputs_interleaves_and_counts() -> None:
    draft = ReferenceModel.perturbed(T, divergence=0.5)
    reqs = [((1, 2), SamplingParams()), ((0,), SamplingParams(temperature=0.0))]
    outs = sample_outputs(
        lambda: T, lambda: draft, reqs, repeats=[7, 2], max_new_tokens=5, mode="ssd",
        config=SSDConfig(k=2, fanout=3), seed=3, driver="sequential", max_batch=4,
    )  # fmt: skip
    assert [len(o) for o in outs] == [7, 2]
    assert len(set(outs[1])) == 1  # greedy
    assert all(len(o) == 5 for o in outs[0])


def test_draw_pairs_test_sees_a_reused_uniform() -> None:
    """A source that answers every key with the same draw fails; the seeded one passes."""

    class Echo:
        def __init__(self) -> None:
            self.inner = SeededSource(1)

        def categorical(self, keys: list[tuple[object, ...]], weights: object) -> list[int]:
            return self.inner.categorical([k[:2] for k in keys], weights)

        def bernoulli(self, keys: list[tuple[object, ...]], probs: list[float]) -> list[bool]:
            return self.inner.bernoulli([k[:2] for k in keys], probs)

    s = RandomStream(1, 0)
    pairs = [(("token", s, r), ("token", s, r + 10_000)) for r in range(2000)]
    bad = draw_pairs_test(Echo(), [((r, 0, 0), (r, 0, 1)) for r in range(2000)], alpha=1e-4)
    good = draw_pairs_test(SeededSource(1), pairs, alpha=1e-4)
    assert bad.rejected and not good.rejected
