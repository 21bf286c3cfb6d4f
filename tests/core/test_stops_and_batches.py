"""Each sequence stops on its own (EOS ids, stop sequences, budget, context size),
even in the middle of a round, and results keep the input order."""

from __future__ import annotations

import pytest

from backends.reference import ReferenceModel
from ssd_core import SamplingParams, SSDConfig, generate

from .helpers import pair

GREEDY = SamplingParams(temperature=0.0)


def _ar_reference(target, prompt, n, stop_ids=(), stop_seqs=()):
    """Plain greedy decoding with the documented stop rules, straight from the model."""
    ctx, out = list(prompt), []
    while len(out) < n:
        z = target.logits(ctx)
        t = int(z.argmax())
        ctx.append(t)
        out.append(t)
        if t in stop_ids or any(
            tuple(out[-len(s) :]) == s for s in stop_seqs if len(out) >= len(s)
        ):
            return out, "stop"
    return out, "length"


@pytest.mark.parametrize("mode", ["ar", "sd", "ssd"])
def test_eos_and_stop_sequences_mid_round(mode):
    target, draft = pair(
        vocab=12, seed=3, divergence=0.0
    )  # everything accepted: K tokens per round
    prompts = [[1], [2, 3], [4, 5, 6], [7]]
    free, _ = _ar_reference(target, prompts[0], 30)
    first = next(i for i in range(5, 30) if free[i] not in free[:i])  # a stop inside round 2
    stop_id = free[first]
    seq = tuple(free[9:11])
    params = [
        SamplingParams(temperature=0.0, stop_token_ids=[stop_id]),
        SamplingParams(temperature=0.0, stop_sequences=[seq]),
        SamplingParams(temperature=0.0, stop_token_ids=[stop_id], stop_sequences=[seq]),
        SamplingParams(temperature=0.0),
    ]
    out = generate(
        target,
        draft,
        prompts=prompts,
        mode=mode,
        max_new_tokens=30,
        sampling=params,
        config=SSDConfig(k=4, fanout=4),
    )
    for prompt, sp, tokens, reason in zip(prompts, params, out.tokens, out.finish_reasons):
        expected, why = _ar_reference(
            target, prompt, 30, sp.stop_token_ids or (), sp.stop_sequences
        )
        assert tokens == expected
        assert reason == why
    assert out.finish_reasons[0] == "stop" and len(out.tokens[0]) == first + 1
    assert target.open_handles == 0 and draft.open_handles == 0


def test_tokenizer_eos_is_the_default_stop():
    target, draft = pair(vocab=12, seed=3)
    free, _ = _ar_reference(target, [1], 20)
    first = next(i for i in range(3, 20) if free[i] not in free[:i])

    class Tok:
        eos_token_ids = (free[first],)

        def encode(self, text, add_special_tokens=True):
            return []

        def decode(self, tokens):
            return " ".join(map(str, tokens))

    target.tokenizer = Tok()
    out = generate(target, draft, prompts=[[1]], mode="ssd", max_new_tokens=20, sampling=GREEDY)
    assert out.tokens[0] == free[: first + 1] and out.finish_reasons == ["stop"]
    assert out.texts == [" ".join(map(str, free[: first + 1]))]
    ignored = generate(
        target,
        draft,
        prompts=[[1]],
        mode="ssd",
        max_new_tokens=20,
        sampling=SamplingParams(temperature=0.0, ignore_eos=True),
    )
    assert ignored.tokens[0] == free[:20]


@pytest.mark.parametrize("mode", ["ar", "sd", "ssd"])
def test_context_size_stops_with_length(mode):
    base = ReferenceModel.random(vocab_size=10, order=2, seed=4)
    target = ReferenceModel(base._raw_fn, vocab_size=10, order=2, context_size=12)
    draft = ReferenceModel(
        ReferenceModel.perturbed(base, divergence=0.2)._raw_fn,
        vocab_size=10,
        order=2,
        context_size=12,
    )
    out = generate(
        target,
        draft,
        prompts=[[1, 2, 3], [4]],
        mode=mode,
        max_new_tokens=50,
        sampling=GREEDY,
        config=SSDConfig(k=3, fanout=3),
    )
    free = [_ar_reference(base, p, 50)[0] for p in ([1, 2, 3], [4])]
    # The target may hold at most 12 tokens: prompt + generated - 1 (the last is never fed).
    assert [len(t) for t in out.tokens] == [12 - 3 + 1, 12 - 1 + 1]
    assert out.tokens == [f[: len(t)] for f, t in zip(free, out.tokens)]
    assert out.finish_reasons == ["length", "length"]


def test_max_new_tokens_zero_and_budget_mid_round():
    target, draft = pair(vocab=12, seed=3, divergence=0.0)
    assert generate(target, draft, prompts=[[1]], max_new_tokens=0).tokens == [[]]
    out = generate(
        target, draft, prompts=[[1], [2]], max_new_tokens=3, sampling=GREEDY, config=SSDConfig(k=5)
    )
    assert [len(t) for t in out.tokens] == [3, 3]


def test_large_vocabulary_without_tables():
    target = ReferenceModel.random(vocab_size=152_064, order=1, seed=0, peakedness=4.0)
    draft = ReferenceModel.perturbed(target, divergence=0.5)
    out = generate(
        target,
        draft,
        prompts=[[5]],
        mode="ssd",
        max_new_tokens=6,
        sampling=SamplingParams(temperature=1.0),
        config=SSDConfig(k=2, fanout=3),
    )
    assert len(out.tokens[0]) == 6 and all(0 <= t < 152_064 for t in out.tokens[0])
