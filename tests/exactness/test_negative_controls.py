"""Negative controls: deliberately lossy variants must be caught by the exact
enumeration *and* by the statistical test (proof that both have teeth).

Finding recorded here: serving a cached speculation built for a *different k* (a
different context) is NOT lossy in this core, because a speculation carries the q its
tokens were sampled from and the verifier uses that q -- the one-round lemma makes
any proposal exact. The enumeration proves it (test_reuse_for_other_k_is_lossless);
the trap (docs/exactness.md, section 4) bites only when the q is re-derived from the new
context. Reusing another *sequence's* speculation is lossy only jointly (the two
sequences become correlated; each marginal stays exact), so it is detected by the
exact joint enumeration.
"""

from __future__ import annotations

import pytest

from backends.reference import ReferenceModel
from conformance.exact import compare_exact
from conformance.stats import statistical_lossless_test
from ssd_core import SamplingParams, SSDConfig

from ._lossy import install

T = ReferenceModel.random(vocab_size=3, order=2, seed=3, peakedness=1.0)
D = ReferenceModel.perturbed(T, divergence=0.5)
P = SamplingParams(temperature=1.0)

CASES = {
    "argmax_accept_on_fast": dict(
        prompts=[[0, 1]],
        params=P,
        mode="ssd",
        config=SSDConfig(k=1, fanout=(0, 0), fallback="fast"),
        max_new_tokens=3,
    ),
    "unrescaled_q": dict(
        prompts=[[0, 1]],
        params=P,
        mode="ssd",
        config=SSDConfig(k=1, fanout=(1, 1), fallback="neural", saguaro_c=0.05),
        max_new_tokens=3,
    ),
    "greedy_draft_softmax_q": dict(
        prompts=[[0, 1]], params=P, mode="sd", config=SSDConfig(k=1), max_new_tokens=3
    ),
    "top_p_first_position_only": dict(
        prompts=[[0, 1]],
        params=SamplingParams(temperature=1.0, top_p=0.6),
        mode="sd",
        config=SSDConfig(k=2),
        max_new_tokens=3,
    ),
}
# Four tokens: a speculation is never longer than what its sequence can still commit, so
# with three the only cached outcomes are first-position rejections, and serving those
# across these two sequences happens not to change the joint distribution (max |diff|
# 1e-17); with four it does (1.0e-3).
SEQ_CASE = dict(
    prompts=[[0, 1], [2]],
    params=P,
    mode="ssd",
    config=SSDConfig(k=1, fanout=(2, 2), fallback="neural", adaptive=False),
    max_new_tokens=4,
)


@pytest.mark.parametrize("variant", sorted(CASES))
def test_exact_enumeration_catches(variant: str) -> None:
    kw = CASES[variant]
    clean = compare_exact(T.logits, D.logits, vocab_size=3, **kw)
    assert clean.max_abs_diff <= 1e-9
    with install(variant) as wrap:
        bad = compare_exact(T.logits, D.logits, vocab_size=3, wrap_source=wrap, **kw)
    assert bad.max_abs_diff > 1e-3, f"{variant} not detected: max|diff| {bad.max_abs_diff:.3g}"


@pytest.mark.slow  # ~4 minutes: a batch of two, four tokens, joint distribution
def test_exact_enumeration_catches_cache_for_another_sequence() -> None:
    with install("cache_any_sequence"):
        bad = compare_exact(T.logits, D.logits, vocab_size=3, max_states=400_000, **SEQ_CASE)
    assert bad.max_abs_diff > 5e-4


@pytest.mark.parametrize("variant", sorted(CASES))
def test_statistical_test_catches(variant: str) -> None:
    kw = dict(CASES[variant])
    with install(variant) as wrap:
        res = _sample(kw, wrap)
    assert res.rejected, f"{variant} not detected statistically: {res.summary()}"


def _sample(kw: dict, wrap: object) -> object:
    return statistical_lossless_test(
        lambda: ReferenceModel.random(vocab_size=3, order=2, seed=3, peakedness=1.0),
        lambda: ReferenceModel.perturbed(T, divergence=0.5),
        T.logits,
        prompt=kw["prompts"][0],
        params=kw["params"],
        mode=kw["mode"],
        config=kw["config"],
        m=3,
        samples=3000,
        seed=11,
        alpha=1e-6,
        wrap_source=wrap,
    )


def test_reuse_for_other_k_is_lossless() -> None:
    """Full-tree (draft-first) enumeration: a lookup that ignores k still gives the
    exact distribution (a speculation is verified with the q it was sampled from)."""
    with install("cache_any_k"):
        c = _other_k()
    assert c.max_abs_diff <= 1e-9


def _other_k() -> object:
    return compare_exact(
        T.logits,
        D.logits,
        vocab_size=3,
        prompts=[[0, 1]],
        params=P,
        mode="ssd",
        config=SSDConfig(k=1, fanout=(1, 2), fallback="neural"),
        max_new_tokens=2,
        order="draft_first",
    )


def test_lemma_ii_check_catches_greedy_draft() -> None:
    """The served-speculation check (lemma ii) has teeth: a greedy draft that records
    the softmax q serves speculations that are not samples from their q."""
    with install("greedy_draft_softmax_q") as wrap:
        c = _greedy_case(wrap)
    assert c.machine.speculation_max_dev > 0.1


def _greedy_case(wrap: object) -> object:
    return compare_exact(
        T.logits,
        D.logits,
        vocab_size=3,
        prompts=[[0, 1]],
        params=P,
        mode="ssd",
        config=SSDConfig(k=1, fanout=(1, 1), fallback="neural", saguaro_c=0.5),
        max_new_tokens=3,
        wrap_source=wrap,
    )
