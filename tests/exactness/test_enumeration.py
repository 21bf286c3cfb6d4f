"""Exactness by whole-machine enumeration (conformance.exact).

Each test enumerates *every* random draw of the full, unmodified machine -- all rounds,
cache hits and misses, neural and fast fallbacks, Saguaro sampling, stops -- and
compares the exact output distribution with the processed target's exact
autoregressive distribution (computed independently of ssd_core). Pass: max |diff|
<= 1e-9 over all output sequences.

What is proven here: exactness of complete runs of up to 2-3 new tokens (several
verification rounds at K=1, the first round and a cache hit/miss/fallback at K=2-3)
on vocabularies 2-6, for the draws as the enumerating source makes them (independent,
with the probabilities the machine asks for; the seeded source itself is tested in
test_random_source.py). Longer runs are not proven: they are checked statistically
(test_statistical.py, test_user_runs.py).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance.exact import compare_exact
from ssd_core import SamplingParams
from tests.strategies import ExactCase, exact_cases

from ._profiles import examples

TOL = 1e-9


def check(case: ExactCase, order: str = "target_first"):
    c = compare_exact(case.target.logits, case.draft.logits, order=order, **case.kwargs())
    assert c.max_abs_diff <= TOL, (
        f"machine differs from the target by {c.max_abs_diff:.3g} (TV {c.tv:.3g}) for {case!r}"
    )
    assert abs(sum(c.machine.outputs.values()) - 1.0) <= TOL
    assert c.machine.leaked_handles == 0
    return c


@examples(30)
@given(exact_cases(mode="sd"))
def test_sd_exact(case: ExactCase) -> None:
    check(case)


@examples(30)
@given(exact_cases(mode="ssd", fallback="neural"))
def test_ssd_neural_fallback_exact(case: ExactCase) -> None:
    check(case)


@examples(30)
@given(exact_cases(mode="ssd", fallback="fast"))
def test_ssd_fast_fallback_exact(case: ExactCase) -> None:
    check(case)


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("mode", ["sd", "ssd"])
@examples(6)
@given(data=st.data())
def test_each_temperature_exact(mode: str, temperature: float, data: st.DataObject) -> None:
    check(data.draw(exact_cases(mode=mode, temperatures=(temperature,), processors=False)))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=2),
        SamplingParams(temperature=0.5, top_p=0.6),
        SamplingParams(temperature=1.0, min_p=0.3),
        SamplingParams(temperature=2.0, top_k=3, top_p=0.9, min_p=0.1, draft_temperature=0.5),
        SamplingParams(temperature=1.0, draft_temperature=0.0),
        SamplingParams(temperature=0.0, draft_temperature=1.0),
    ],
    ids=["top_k", "top_p", "min_p", "all", "greedy-draft", "greedy-target"],
)
@pytest.mark.parametrize("mode", ["sd", "ssd"])
@examples(4)
@given(data=st.data())
def test_each_processor_exact(mode: str, params: SamplingParams, data: st.DataObject) -> None:
    case = data.draw(exact_cases(mode=mode, processors=False))
    import attrs

    check(attrs.evolve(case, params=(params,) * len(case.prompts)))


@pytest.mark.parametrize("c", [1.0, 0.5, 0.05])
@examples(8)
@given(data=st.data())
def test_saguaro_c_exact(c: float, data: st.DataObject) -> None:
    check(data.draw(exact_cases(mode="ssd", saguaro=(c,))))


@pytest.mark.parametrize("mode", ["sd", "ssd"])
@examples(10)
@given(data=st.data())
def test_batch_of_two_prompts_exact(mode: str, data: st.DataObject) -> None:
    check(data.draw(exact_cases(mode=mode, batch=2, ks=(1, 2))))


@pytest.mark.parametrize("mode", ["sd", "ssd"])
@examples(10)
@given(data=st.data())
def test_stops_inside_a_round_exact(mode: str, data: st.DataObject) -> None:
    check(data.draw(exact_cases(mode=mode, stops=True)))


@examples(8)
@given(exact_cases(mode="ssd", ks=(1,), temperatures=(0.5, 1.0), max_vocab=3))
def test_full_tree_draft_first_exact(case: ExactCase) -> None:
    """Draft-first order: every tree branch is decoded and sampled before the
    verification returns, so a cached speculation used for the wrong outcome or
    sequence would show up here even though target-first pruning would hide it."""
    check(case, order="draft_first")
