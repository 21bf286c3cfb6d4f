"""Greedy SD and SSD reproduce greedy AR token for token (ties break to the lowest id)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from backends.reference import ReferenceModel
from ssd_core import SamplingParams, SSDConfig, generate

GREEDY = SamplingParams(temperature=0.0)


@st.composite
def greedy_case(draw):
    vocab = draw(st.integers(2, 24))
    order = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 10_000))
    tie_levels = draw(st.one_of(st.none(), st.integers(1, 4)))
    target = ReferenceModel.random(
        vocab_size=vocab,
        order=order,
        seed=seed,
        peakedness=draw(st.sampled_from([0.0, 0.5, 3.0])),
        tie_levels=tie_levels,
        zero_fraction=draw(st.sampled_from([0.0, 0.3])),
    )
    draft = ReferenceModel.perturbed(
        target, divergence=draw(st.sampled_from([0.0, 0.3, 2.0])), seed=seed + 1
    )
    k = draw(st.integers(1, 5))
    fanout = draw(
        st.one_of(st.integers(0, 12), st.lists(st.integers(0, 3), min_size=k + 1, max_size=k + 1))
    )
    batch = draw(st.integers(1, 3))
    prompts = [
        draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=6)) for _ in range(batch)
    ]
    config = SSDConfig(
        k=k,
        fanout=fanout,
        fallback=draw(st.sampled_from(["neural", "fast", "auto"])),
        saguaro_c=draw(st.sampled_from([1.0, 0.5])),
    )
    return target, draft, prompts, config, draw(st.integers(1, 24))


@given(greedy_case())
def test_sd_and_ssd_equal_ar_when_greedy(case):
    target, draft, prompts, config, n = case
    ar = generate(target, None, prompts=prompts, mode="ar", max_new_tokens=n, sampling=GREEDY)
    for mode in ("sd", "ssd"):
        out = generate(
            target,
            draft,
            prompts=prompts,
            mode=mode,
            max_new_tokens=n,
            sampling=GREEDY,
            config=config,
        )
        assert out.tokens == ar.tokens, mode
        assert out.finish_reasons == ar.finish_reasons
        assert all(len(t) == n for t in out.tokens)
    assert target.open_handles == 0 and draft.open_handles == 0


def test_ties_break_to_lowest_id():
    # Every logit equal: greedy must pick token 0 every time, in every mode.
    target = ReferenceModel.from_callable(lambda ctx: [0.0] * 5, vocab_size=5, order=1)
    draft = ReferenceModel.from_callable(
        lambda ctx: [0.0, 0.0, 0.0, 0.0, 0.1], vocab_size=5, order=1
    )
    for mode in ("ar", "sd", "ssd"):
        out = generate(target, draft, prompts=[[3]], mode=mode, max_new_tokens=6, sampling=GREEDY)
        assert out.tokens == [[0] * 6], mode


def test_identical_draft_accepts_everything():
    target = ReferenceModel.random(vocab_size=32, order=2, seed=3)
    draft = ReferenceModel.perturbed(target, divergence=0.0)
    out = generate(
        target,
        draft,
        prompts=[[1, 2]],
        mode="ssd",
        max_new_tokens=40,
        sampling=GREEDY,
        config=SSDConfig(k=4, fanout=8, adaptive=False),
    )
    m = out.metrics
    assert m.accepted_per_proposed == 1.0
    assert m.cache_hit_rate == 1.0  # the bonus token is the draft's top candidate at position K
    assert m.tokens_per_target_pass == 5.0
