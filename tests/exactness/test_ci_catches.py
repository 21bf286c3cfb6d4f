"""Every negative control is caught by the default (CI) statistical tier itself.

Each lossy variant (tests/exactness/_lossy.py) is installed and the one population of
the CI family (tests/exactness/_runs.py) that exercises its trap is sampled -- same
engine, driver, request, statistic (first and late tokens with the length), binning
(<= 16 bins) and per-test level (the family's Bonferroni alpha) -- at N_CONTROL runs,
fewer than the family's SAMPLES. A variant rejected at N_CONTROL is rejected with at
least that power at SAMPLES; the printed "power@SAMPLES" is the plug-in estimate
``P(ncx2(df, (G - df) * SAMPLES / N_CONTROL) > critical value)``.

The trap the old family missed -- "accept by argmax on the fast backup" at T = 1
(p = 0.41 at n = 8000 on the first 3 tokens of a vocabulary-50 run with fan-out
(2, 1, 1, 2)) -- is caught by the ``fast-only`` case: no speculation cache, so every
round after the first verifies n-gram backup tokens, on a 4-token vocabulary where
the backup token is often likely but not the argmax.
"""

from __future__ import annotations

from typing import Any

import pytest
from scipy.stats import chi2, ncx2

from conformance.stats import GTestResult

from ._lossy import install
from ._runs import ALPHA, EFFECT_TV, ENGINES, PAIR_SAMPLES, REPORT, SAMPLES, g_tests, sample_case
from .test_user_runs import pair_test

N_CONTROL = 1000

#: variant -> (engine case, population) of the CI family that exercises its trap.
CONTROLS = {
    "argmax_accept_on_fast": ("fast-only", "T1"),
    "unrescaled_q": ("context", "context-stop"),
    "greedy_draft_softmax_q": ("users", "defaults-eos"),
    "top_p_first_position_only": ("users", "processors-ignore-eos-text-stop"),
    "shared_accept_uniform": ("auto", "T1"),
}


def power_at(res: GTestResult, n_full: int) -> float:
    """Plug-in power of the same test at ``n_full`` samples against this variant."""
    if res.statistic == float("inf"):
        return 1.0
    lam = max(res.statistic - res.df, 0.0) * n_full / res.samples
    return float(ncx2.sf(chi2.isf(res.alpha, res.df), res.df, lam))


def _report(variant: str, results: dict[str, Any], n_full: int) -> None:
    for name, res in results.items():
        REPORT.append(
            f"control {variant} -> {name}: {res.summary()} power@{n_full}={power_at(res, n_full):.3f}"
        )


@pytest.mark.parametrize("variant", sorted(CONTROLS))
def test_ci_family_catches(variant: str) -> None:
    case_name, pop = CONTROLS[variant]
    case = ENGINES[case_name]
    with install(variant) as wrap:
        outputs = sample_case(case, samples=N_CONTROL, populations=[pop], wrap_source=wrap)
    results = g_tests(
        case, outputs, alpha=ALPHA, effect_tv=EFFECT_TV, samples=N_CONTROL, record=False
    )
    _report(variant, results, SAMPLES)
    assert any(r.rejected for r in results.values()), f"{variant} not caught: " + "; ".join(
        r.summary() for r in results.values()
    )


def test_ci_family_catches_cache_for_another_sequence() -> None:
    """A speculation served to another sequence keeps every marginal exact; the
    batch-independence test of the CI family sees the correlation."""
    with install("cache_any_sequence") as wrap:
        res = pair_test(N_CONTROL, wrap_source=wrap)
    _report("cache_any_sequence", {"pairs/independence": res}, PAIR_SAMPLES)
    assert res.rejected, res.summary()
