"""CostModel.from_models: what the speculation policy plans with, from the models'
declared latencies."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ssd_core import ConfigError, CostModel, LatencyModel


def _m(latency):
    return SimpleNamespace(latency=latency)


def test_declared_costs_become_the_cost_model():
    t = LatencyModel(per_call=0.05, per_token=0.006)
    d = LatencyModel(per_call=0.002, per_token=0.009, prefill_per_token=0.003)
    cost = CostModel.from_models(_m(t), _m(d))
    assert (cost.verify_call, cost.verify_row) == (0.05, 0.006)
    assert (cost.draft_call, cost.draft_row) == (0.002, 0.009)
    # Catching a draft up with several tokens of one sequence costs its prefill rate.
    assert cost.draft_glue_row == 0.003


def test_an_undeclared_prefill_rate_is_the_row_rate():
    t = LatencyModel(per_call=0.05, per_token=0.006)
    d = LatencyModel(per_call=0.002, per_token=0.009)  # prefill_per_token left at 0
    assert CostModel.from_models(_m(t), _m(d)).draft_glue_row == 0.009


def test_no_declared_target_cost_assumes_a_memory_bound_target():
    assert CostModel.from_models(object(), None) == CostModel.memory_bound()
    only = CostModel.from_models(_m(LatencyModel(per_call=1.0, per_token=0.1)), object())
    assert only.draft_call == pytest.approx(0.11) and only.draft_glue_row == 0.0


def test_bad_costs_are_refused():
    with pytest.raises(ConfigError):
        CostModel(verify_call=1.0, verify_row=0.1, draft_prefill_row=-1.0)
