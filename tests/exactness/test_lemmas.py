"""The two-lemma split (docs/exactness.md, section 2), for cases whole runs cannot reach.

(i)  One verification round is exact for *any* proposal, point masses included:
     enumerate the first round only (max_new_tokens = 1 keeps only the first committed
     token, whatever the proposal) at vocab 6, K = 2, for neural drafts, Saguaro-
     rescaled drafts and point-mass (fast) proposals.
(ii) Conditioned on every verification outcome and context, the speculation served
     next (cache hit or fast fallback) is distributed exactly as a fresh sample from
     the q it carries: checked at every round boundary of the enumeration
     (ExactDistribution.speculation_max_dev), including full-tree (draft-first) runs.
On paper, (i) and (ii) give exactness of a whole run by induction over rounds; but
(ii) is *checked* only at the round boundaries these small enumerations reach
(vocab <= 6, a few tokens), so the induction is not a test. Whole runs beyond that are
checked statistically (test_statistical.py, test_user_runs.py).

Also here: the enumeration asserts that cache hits and misses are each reached with
nonzero probability where the configuration claims so.
"""

from __future__ import annotations

import pytest

from backends.reference import ReferenceModel
from conformance.exact import compare_exact
from ssd_core import SamplingParams, SSDConfig

V8 = ReferenceModel.random(vocab_size=6, order=2, seed=21, peakedness=1.5)
D8 = ReferenceModel.perturbed(V8, divergence=1.0)


@pytest.mark.parametrize(
    "mode,config",
    [
        ("sd", SSDConfig(k=2)),
        ("ssd", SSDConfig(k=2, fanout=(2, 1, 2), fallback="fast", saguaro_c=0.05)),
    ],
    ids=["neural-proposal", "saguaro-then-point-mass"],
)
def test_lemma_one_round_exact_any_proposal(mode: str, config: SSDConfig) -> None:
    c = compare_exact(
        V8.logits,
        D8.logits,
        vocab_size=6,
        prompts=[[1, 2]],
        params=SamplingParams(temperature=1.0, top_k=5),
        mode=mode,
        config=config,
        max_new_tokens=1,
    )
    assert c.max_abs_diff <= 1e-9


T3 = ReferenceModel.random(vocab_size=3, order=2, seed=4, peakedness=1.0)
D3 = ReferenceModel.perturbed(T3, divergence=0.8)


@pytest.mark.parametrize("fallback", ["neural", "fast"])
@pytest.mark.parametrize("order", ["target_first", "draft_first"])
def test_lemma_served_speculation_is_a_fresh_sample(fallback: str, order: str) -> None:
    c = compare_exact(
        T3.logits,
        D3.logits,
        vocab_size=3,
        prompts=[[0, 1]],
        params=SamplingParams(temperature=1.0),
        mode="ssd",
        config=SSDConfig(k=1, fanout=(1, 1), fallback=fallback, saguaro_c=0.5),
        max_new_tokens=3,
        order=order,
    )
    assert c.machine.speculation_max_dev <= 1e-9
    assert c.max_abs_diff <= 1e-9


@pytest.mark.parametrize(
    "fanout,hits,misses",
    [((1, 1), True, True), ((3, 3), True, False), ((0, 0), False, True)],
    ids=["partial", "full", "none"],
)
def test_hits_and_misses_reached_as_claimed(
    fanout: tuple[int, int], hits: bool, misses: bool
) -> None:
    c = compare_exact(
        T3.logits,
        D3.logits,
        vocab_size=3,
        prompts=[[0, 1]],
        params=SamplingParams(temperature=1.0),
        mode="ssd",
        config=SSDConfig(k=1, fanout=fanout, fallback="neural"),
        # 4 tokens: a speculation is never longer than what the sequence can still
        # commit, so with 3 only a first-position rejection could reach the cache.
        max_new_tokens=4,
    )
    assert c.max_abs_diff <= 1e-9
    assert (c.machine.hit_probability_mass > 0) is hits
    assert (c.machine.miss_probability_mass > 0) is misses
    assert (c.machine.fallbacks.get("neural", 0.0) > 0) is misses
