"""The statistical tier on what users run (tests/exactness/_runs.py has the cases).

Real random source, whole 16-token runs, tests at the first and at late positions,
mixed batches under all three drivers; one Bonferroni family per tier. Each test
states its power: default tier >= 0.9 against any alternative at binned TV >= 0.05;
slow tier (``-m slow``) >= 0.9 at TV 0.02. The figures of every test are printed at
the end of the run.
"""

from __future__ import annotations

from typing import Any

import pytest

from conformance.stats import effective_params, exact_run_distribution, g_test, output_probability
from ssd_core import Metrics

from ._runs import (
    ALPHA,
    DEFAULT_ENGINES,
    EFFECT_TV,
    ENGINES,
    MAX_BINS,
    PAIR_SAMPLES,
    PAIRS,
    PAIRS_POSITION,
    PAIRS_VOCAB,
    REPORT,
    SAMPLES,
    SLOW_ALPHA,
    SLOW_EFFECT_TV,
    SLOW_SAMPLES,
    budget,
    g_tests,
    sample_case,
    stated_power,
)


def test_stated_power() -> None:
    """Sample sizes give power >= 0.9 per test at the stated effect (df <= 15)."""
    assert stated_power(SAMPLES, ALPHA, EFFECT_TV) >= 0.9
    assert stated_power(PAIR_SAMPLES, ALPHA, EFFECT_TV, df=PAIRS_VOCAB**2 - 1) >= 0.9
    assert stated_power(SLOW_SAMPLES, SLOW_ALPHA, SLOW_EFFECT_TV) >= 0.9


def _check_metrics(name: str, m: Metrics) -> None:
    """Each case exercises what it is there for."""
    assert m.draft_faults == 0
    if name == "users":
        assert m.cache_hits > 0 and m.fallbacks.get("neural", 0) > 0
    elif name == "auto":
        # Both fallbacks were chosen: auto really switched (about 3 fast : 1 neural
        # when measured; the choice follows real times, so the mix varies run to run).
        assert m.fallbacks.get("neural", 0) > 0 and m.fallbacks.get("fast", 0) > 0
    elif name == "context":
        assert m.cache_hits > 0 and m.fallbacks.get("fast", 0) > 0
    elif name == "fast-only":
        assert m.cache_hits == 0 and m.fallbacks.get("fast", 0) > 0


def _check_neighbours(name: str, outputs: dict[str, list[tuple[int, ...]]]) -> None:
    """The cheap neighbours: every output possible under the target; greedy exact."""
    case = ENGINES[name]
    target = case.make_target()
    for pop in case.populations:
        if pop.share == 1.0:
            continue
        params = effective_params(target, pop.exact or pop.params)
        limit = budget(case, target, pop.prompt)
        for toks in set(outputs[pop.name]):
            prob = output_probability(target.logits, pop.prompt, params, toks, max_new=limit)
            assert prob > 0.0, f"{name}/{pop.name}: impossible output {toks}"
            if pop.params.temperature == 0.0:
                assert prob == 1.0  # greedy: the one output the target allows


@pytest.mark.parametrize("name", DEFAULT_ENGINES)
def test_user_runs_match_target(name: str) -> None:
    case = ENGINES[name]
    metrics: list[Metrics] = []
    outputs = sample_case(case, samples=SAMPLES, on_metrics=metrics.append)
    _check_metrics(name, metrics[0])
    _check_neighbours(name, outputs)
    results = g_tests(case, outputs, alpha=ALPHA, effect_tv=EFFECT_TV, samples=SAMPLES)
    assert results and all(r.power >= 0.9 for r in results.values())
    bad = [f"{k}: {r.summary()}" for k, r in results.items() if r.rejected]
    assert not bad, "\n".join(bad)


def pair_test(samples: int, wrap_source: Any = None) -> Any:
    """G-test that two sequences with the same request in one batch are independent:
    (token of a, token of b) at PAIRS_POSITION against the product of the exact laws."""
    outs = sample_case(PAIRS, samples=samples, wrap_source=wrap_source)
    target = PAIRS.make_target()
    pop = PAIRS.populations[0]
    law = exact_run_distribution(
        target.logits, pop.prompt, pop.params, max_new=PAIRS.max_new_tokens, order=2,
        positions=PAIRS_POSITION,
    )  # fmt: skip
    joint = {(x, y): px * py for x, px in law.items() for y, py in law.items()}
    counts: dict[Any, int] = {}
    for a, b in zip(outs["a"], outs["b"], strict=True):
        key = (tuple(a[i] for i in PAIRS_POSITION), tuple(b[i] for i in PAIRS_POSITION))
        counts[key] = counts.get(key, 0) + 1
    return g_test(counts, joint, alpha=ALPHA, effect_tv=EFFECT_TV, max_bins=MAX_BINS)


def test_batch_neighbours_are_independent() -> None:
    """Sequences of one batch are independent (the reference for a batch is the
    product of the per-request laws): a draft equal to the target and a full
    fan-out, so that a speculation served to the wrong sequence would correlate them."""
    res = pair_test(PAIR_SAMPLES)
    REPORT.append(f"pairs/independence{list(PAIRS_POSITION)}: {res.summary()}")
    assert res.power >= 0.9
    assert not res.rejected, res.summary()


@pytest.mark.slow  # TV 0.02: n = 31 000 per population; tens of minutes on 2 cores
@pytest.mark.parametrize("name", list(ENGINES))
def test_user_runs_match_target_slow(name: str) -> None:
    case = ENGINES[name]
    outputs = sample_case(case, samples=SLOW_SAMPLES, full_shares=True)
    results = g_tests(
        case, outputs, alpha=SLOW_ALPHA, effect_tv=SLOW_EFFECT_TV, samples=SLOW_SAMPLES
    )
    assert len(results) == 2 * len(case.populations)
    bad = [f"{k}: {r.summary()}" for k, r in results.items() if r.rejected]
    assert not bad, "\n".join(bad)
