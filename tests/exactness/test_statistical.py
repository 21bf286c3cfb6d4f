"""Statistical exactness of the first tokens on a larger vocabulary: vocab 50, K = 3,
five sampling-processor settings x four modes (ar, sd, ssd neural, ssd fast) on the
reference backend, sequential driver, fixed fan-out lists.

Each test G-tests the first m = 3 generated tokens against the processed target's
exact distribution of those tokens. Three tokens are one K = 3 round when the first
draft tokens are accepted and span up to three rounds (with cache lookups and
fallbacks) only when they are rejected early; late positions of long runs, integer
budgets, "auto", the other drivers, stops and mixed batches are the business of
test_user_runs.py. The family below has FAMILY_SIZE tests; each runs at
alpha = 1e-4 / FAMILY_SIZE (Bonferroni). Seeds are fixed, so a run is reproducible.
The power against the least favourable alternative at binned TV >= 0.05 (CI) and
0.02 (deep) is computed (conformance.stats.power_lower_bound) and asserted >= 0.9.
"""

from __future__ import annotations

import pytest

from backends.reference import ReferenceModel
from conformance.stats import bonferroni, power_lower_bound, statistical_lossless_test
from ssd_core import SamplingParams, SSDConfig

from ._profiles import DEEP

VOCAB = 50
M_TOKENS = 3
MAX_BINS = 16


def make_target() -> ReferenceModel:
    return ReferenceModel.random(vocab_size=VOCAB, order=2, seed=5, peakedness=2.0)


TARGET = make_target()


def make_draft() -> ReferenceModel:
    return ReferenceModel.perturbed(TARGET, divergence=0.7)


MODES = {
    "ar": ("ar", None),
    "sd": ("sd", SSDConfig(k=3)),
    "ssd-neural-C0.5": (
        "ssd",
        SSDConfig(k=3, fanout=(2, 1, 1, 2), fallback="neural", saguaro_c=0.5),
    ),
    "ssd-fast": ("ssd", SSDConfig(k=3, fanout=(2, 1, 1, 2), fallback="fast")),
}
PROCESSORS = {
    "T1": SamplingParams(temperature=1.0),
    "T0.5-topk": SamplingParams(temperature=0.5, top_k=5),
    "topp": SamplingParams(temperature=1.0, top_p=0.8),
    "minp": SamplingParams(temperature=1.0, min_p=0.05),
    "T2-draftT0.7": SamplingParams(temperature=2.0, top_k=20, draft_temperature=0.7),
}
FAMILY_SIZE = len(MODES) * len(PROCESSORS)
ALPHA = bonferroni(1e-4, FAMILY_SIZE)
EFFECT_TV = 0.02 if DEEP else 0.05
#: required_samples(15, ALPHA, 0.05) = 5728; (15, ALPHA, 0.02) = 35 840.
SAMPLES = 48_000 if DEEP else 5_800


def test_stated_power() -> None:
    """The sample size gives power >= 0.9 against any binned-TV >= EFFECT_TV alternative."""
    assert power_lower_bound(SAMPLES, MAX_BINS - 1, ALPHA, EFFECT_TV) >= 0.9


@pytest.mark.parametrize("proc", sorted(PROCESSORS))
@pytest.mark.parametrize("mode", sorted(MODES))
def test_first_tokens_match_target(mode: str, proc: str) -> None:
    run_mode, config = MODES[mode]
    res = statistical_lossless_test(
        make_target,
        make_draft,
        TARGET.logits,
        prompt=[1, 2, 3],
        params=PROCESSORS[proc],
        mode=run_mode,
        config=config,
        m=M_TOKENS,
        samples=SAMPLES,
        seed=1000 + 17 * sorted(MODES).index(mode) + sorted(PROCESSORS).index(proc),
        alpha=ALPHA,
        effect_tv=EFFECT_TV,
        max_bins=MAX_BINS,
    )
    assert not res.rejected, f"{mode}/{proc}: {res.summary()}"


# -- vocab 1000, slow tier: its own Bonferroni family of LARGE_FAMILY tests ----------

LARGE_MODES = {
    "sd": ("sd", SSDConfig(k=3)),
    "ssd-neural-C0.5": (
        "ssd",
        SSDConfig(k=3, fanout=(2, 1, 1, 2), fallback="neural", saguaro_c=0.5),
    ),
    "ssd-fast": ("ssd", SSDConfig(k=3, fanout=(2, 1, 1, 2), fallback="fast")),
}
LARGE_ALPHA = bonferroni(1e-4, len(LARGE_MODES))
LARGE_SAMPLES = 48_000 if DEEP else 8_000


@pytest.mark.slow  # ~10-30 s each at n = 8000 (vocab 1000, first 2 tokens, 1e6 cells)
@pytest.mark.parametrize("mode", sorted(LARGE_MODES))
def test_vocab_1000_first_tokens_match_target(mode: str) -> None:
    target = ReferenceModel.random(vocab_size=1000, order=2, seed=8, peakedness=2.5)
    run_mode, config = LARGE_MODES[mode]
    res = statistical_lossless_test(
        lambda: target,
        lambda: ReferenceModel.perturbed(target, divergence=0.7),
        target.logits,
        prompt=[1, 2, 3],
        params=SamplingParams(temperature=1.0),
        mode=run_mode,
        config=config,
        m=2,
        samples=LARGE_SAMPLES,
        seed=7000 + sorted(LARGE_MODES).index(mode),
        alpha=LARGE_ALPHA,
        effect_tv=EFFECT_TV,
        max_bins=MAX_BINS,
    )
    assert not res.rejected, f"vocab 1000 {mode}: {res.summary()}"
