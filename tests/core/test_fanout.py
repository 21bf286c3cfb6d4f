"""Thm 12 allocation and the online estimates behind it."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ssd_core import OutcomeStats, geometric_fanout


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


def test_power_law_exponent_is_recovered_from_ranks():
    rng = np.random.default_rng(0)
    for r in (0.5, 1.0, 2.0):
        stats = OutcomeStats(window=20000)
        # P(rank > F) = F^-r  <=>  rank = ceil(U^(-1/r))
        for u in rng.random(20000):
            stats.observe(0, 1, math.ceil(u ** (-1 / r)))
        assert abs(stats.power_law_r - r) < 0.15 * r


def test_acceptance_estimate():
    stats = OutcomeStats()
    assert stats.accept_rate == 0.5
    stats.observe(3, 4, None)
    stats.observe(1, 4, None)
    assert stats.accept_rate == (4 + 1) / (8 + 2)
