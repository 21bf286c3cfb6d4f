"""Thm 12 allocation, the online estimates behind it, and the default policies."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssd_core import (
    ConfigError,
    InputError,
    OutcomeStats,
    default_budget,
    default_saguaro_c,
    geometric_fanout,
    outcome_fanout,
    uniform_fanout,
)


@given(st.integers(0, 64), st.integers(1, 8), st.floats(0.0, 1.0), st.floats(0.05, 10))
def test_allocation_sums_to_budget(budget, k, a, r):
    f = geometric_fanout(budget, k, a, r)
    assert len(f) == k + 1 and sum(f) == budget and min(f) >= 0


def test_allocation_follows_the_formula():
    a, r, k, b = 0.7, 1.0, 4, 1000
    f = geometric_fanout(b, k, a, r)
    e = 1 / (1 + r)
    raw = [a ** (j * e) for j in range(k)] + [a ** (k * e) * (1 - a) ** (-e)]
    expected = [b * x / sum(raw) for x in raw]
    assert all(abs(x - y) <= 1 for x, y in zip(f, expected))
    assert list(f[:k]) == sorted(f[:k], reverse=True)  # geometric decay before the cap


@given(st.integers(0, 64), st.integers(1, 8))
def test_uniform_allocation(budget, k):
    f = uniform_fanout(budget, k)
    assert len(f) == k + 1 and sum(f) == budget and max(f) - min(f) <= 1
    assert list(f) == sorted(f, reverse=True)


def _truncated_geometric(rng, a, k, rounds):
    """Accepted lengths of K-token speculations with per-token acceptance ``a``."""
    out = []
    for _ in range(rounds):
        n = 0
        while n < k and rng.random() < a:
            n += 1
        out.append(n)
    return out


def test_per_token_acceptance_is_accepted_over_accepted_plus_rejections():
    stats = OutcomeStats(prior_acceptance=0.5, prior_weight=2.0)
    stats.observe(3, 4, None)  # 3 accepted, then a rejection
    stats.observe(4, 4, None)  # all accepted: no rejection
    stats.observe(0, 4, None)  # rejected at once
    assert (stats.accepted, stats.proposed, stats.rejections) == (7, 12, 2)
    assert stats.per_token_acceptance == pytest.approx((7 + 2 * 0.5) / (7 + 2 + 2))
    assert stats.accepted_fraction == pytest.approx(7 / 12)
    assert stats.accept_rate == stats.per_token_acceptance  # the engine-v1 name


def test_per_token_acceptance_recovers_the_true_rate_where_the_fraction_does_not():
    rng = np.random.default_rng(0)
    k, a = 6, 0.87
    stats = OutcomeStats()
    for n in _truncated_geometric(rng, a, k, 5000):
        stats.observe(n, k, None)
    assert stats.per_token_acceptance == pytest.approx(a, abs=0.01)
    expected_fraction = a * (1 - a**k) / (1 - a) / k  # ~0.62: a different number
    assert stats.accepted_fraction == pytest.approx(expected_fraction, abs=0.02)


def test_the_right_rate_does_not_pile_the_budget_on_the_first_positions():
    # The case: K = 8, B = 27. Fed accepted/proposed (~0.42) the rule gives
    # F_0 >= 8 and leaves the last positions with 1; fed the per-token rate it is flat.
    piled = geometric_fanout(27, 8, 0.42, 1.0)
    assert piled[0] >= 7 and piled[-2] <= 1
    flat = geometric_fanout(27, 8, 0.85, 1.0)
    assert max(flat[:8]) - min(flat[:8]) <= 2 and flat[8] >= flat[0]


def test_estimates_start_at_the_prior_and_stay_sane_after_one_round():
    stats = OutcomeStats(prior_acceptance=0.8, prior_r=1.5)
    assert stats.per_token_acceptance == 0.8
    assert stats.power_law_r == pytest.approx(1.5)
    assert stats.plan(21, 6) == geometric_fanout(21, 6, 0.8, 1.5)
    stats.observe(0, 6, 5)
    assert 0.5 < stats.per_token_acceptance < 0.8  # one rejection moves it, not to 0
    full = OutcomeStats(prior_acceptance=0.8)
    full.observe(6, 6, 1)
    assert 0.8 < full.per_token_acceptance < 1.0  # one full acceptance: not to 1
    for s in (stats, full):
        assert 0.1 <= s.power_law_r <= 10 and sum(s.plan(21, 6)) == 21


def test_power_law_exponent_is_recovered_from_ranks():
    rng = np.random.default_rng(0)
    for r in (0.5, 1.0, 2.0):
        stats = OutcomeStats(window=20000)
        # P(rank > F) = F^-r  <=>  rank = ceil(U^(-1/r))
        for u in rng.random(20000):
            stats.observe(0, 1, math.ceil(u ** (-1 / r)))
        assert abs(stats.power_law_r - r) < 0.15 * r


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 12),
    st.lists(st.integers(1, 80), min_size=0, max_size=60),
)
def test_the_windowed_histogram_equals_a_fit_of_the_last_ranks(window, ranks):
    running = OutcomeStats(window=window)
    for x in ranks:
        running.observe(0, 1, x)
        running.power_law_r  # noqa: B018 - interleave fits with evictions
    fresh = OutcomeStats(window=window)
    for x in ranks[-window:]:
        fresh.observe(0, 1, x)
    assert running.power_law_r == fresh.power_law_r


def test_the_fit_is_cached_until_a_rank_arrives(monkeypatch):
    stats = OutcomeStats()
    calls = []
    real = OutcomeStats._fit

    def counting(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(OutcomeStats, "_fit", counting)
    stats.observe(2, 4, 3)
    for _ in range(5):
        stats.power_law_r  # noqa: B018
        stats.plan(21, 6)
    assert len(calls) == 1
    stats.observe(2, 4, None)  # no rank: the fit stands
    stats.plan(21, 6)
    assert len(calls) == 1
    stats.observe(2, 4, 1)
    stats.plan(21, 6)
    assert len(calls) == 2


def test_the_plan_follows_new_observations():
    stats = OutcomeStats(prior_acceptance=0.5)
    before = stats.plan(21, 6)
    for _ in range(200):
        stats.observe(6, 6, 1)
    after = stats.plan(21, 6)
    assert after != before and after[-1] > before[-1]  # more mass on "all accepted"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window": 0},
        {"prior_acceptance": 1.5},
        {"prior_acceptance": float("nan")},
        {"prior_r": 0.0},
        {"prior_r": float("inf")},
        {"prior_weight": 0.0},
    ],
)
def test_bad_priors_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        OutcomeStats(**kwargs)


def test_bad_observations_are_input_errors():
    stats = OutcomeStats()
    with pytest.raises(InputError):
        stats.observe(5, 4, None)
    with pytest.raises(InputError):
        stats.observe(-1, 4, None)
    with pytest.raises(InputError):
        stats.observe(1, 4, 0)
    assert stats.proposed == 0  # nothing was recorded


def test_default_budget_scales_with_k():
    assert [default_budget(k) for k in (1, 4, 6, 8)] == [6, 15, 21, 27]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ConfigError):
            default_budget(bad)


def test_default_saguaro_c_by_temperature():
    assert default_saguaro_c(0.0) == 1.0  # greedy drafts ignore C
    assert default_saguaro_c(0.5) == default_saguaro_c(0.7) == 0.85
    assert default_saguaro_c(1.0) == default_saguaro_c(1.5) == 1.0
    ts = [0.01 * i for i in range(1, 200)]
    cs = [default_saguaro_c(t) for t in ts]
    assert all(0.0 < c <= 1.0 for c in cs)
    # Continuous above 0 (no jump a user could trip over by nudging the temperature).
    assert max(abs(a - b) for a, b in zip(cs, cs[1:])) < 0.01
    for bad in (-0.1, float("nan"), float("inf"), "1"):
        with pytest.raises(ConfigError):
            default_saguaro_c(bad)


@given(st.integers(0, 64), st.integers(1, 8), st.floats(0.02, 0.98), st.floats(0.05, 10))
def test_thm12_for_a_geometric_outcome_is_the_geometric_rule(budget, k, a, r):
    probs = [a**j * (1 - a) for j in range(k)] + [a**k]
    plan = outcome_fanout(budget, probs, r)
    assert sum(plan) == budget and len(plan) == k + 1
    assert plan == geometric_fanout(budget, k, a, r)


def test_outcome_probs_follow_each_positions_own_acceptance():
    s = OutcomeStats(prior_acceptance=0.5, prior_weight=1e-6)
    for _ in range(100):  # the first position is always rejected ...
        s.observe(0, 4, None)
    for _ in range(100):  # ... or always accepted, and then everything is
        s.observe(4, 4, None)
    probs = s.outcome_probs(4)
    assert probs[0] == pytest.approx(0.5, abs=1e-3)
    assert probs[4] == pytest.approx(0.5, abs=1e-3)
    assert sum(probs[1:4]) == pytest.approx(0.0, abs=1e-3)
    assert sum(probs) == pytest.approx(1.0)
    # A geometric fit of the same rounds (a = 400 / 500) would spread the middle.
    plan = s.plan(10, 4)
    assert plan[1] == plan[2] == plan[3] == 0 and plan[0] + plan[4] == 10


def test_positions_never_tried_use_the_pooled_acceptance():
    s = OutcomeStats(prior_acceptance=0.8)
    s.observe(1, 2, None)
    assert s.acceptance_at(5) == s.per_token_acceptance
