"""Bad input gets a clear, typed error before any model call."""

from __future__ import annotations

import math

import pytest

from backends.reference import ReferenceModel
from ssd_core import (
    ConfigError,
    InputError,
    SamplingParams,
    SSDConfig,
    SSDError,
    UnknownOptionError,
    generate,
    stream,
)

from .helpers import Recording


@pytest.fixture
def models() -> tuple[Recording, Recording]:
    t = ReferenceModel.random(vocab_size=8, order=1, seed=0)
    return Recording(t), Recording(ReferenceModel.perturbed(t, divergence=0.3))


CASES = [
    (dict(prompts=[[]]), InputError, "empty"),
    (dict(prompts=[]), InputError, "non-empty"),
    (dict(prompts=[[1, 99]]), InputError, "outside the vocabulary"),
    (dict(prompts=[[1, -1]]), InputError, "outside the vocabulary"),
    (dict(prompts="abc"), InputError, "token-id lists"),
    (dict(prompts=[[1.5]]), InputError, "not a token id"),
    (dict(mode="fast"), UnknownOptionError, "unknown mode"),
    (dict(driver="gpu"), UnknownOptionError, "unknown driver"),
    (dict(max_new_tokens=-1), ConfigError, "max_new_tokens"),
    (dict(sampling=[SamplingParams(), SamplingParams()]), ConfigError, "one per prompt"),
    (dict(sampling=SamplingParams(stop_token_ids=[100])), ConfigError, "stop token id"),
]


@pytest.mark.parametrize(("kwargs", "error", "text"), CASES)
def test_bad_call_raises_before_any_model_call(models, kwargs, error, text):
    target, draft = models
    args = dict(prompts=[[1, 2]], mode="ssd", max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(error, match=text):
        generate(target, draft, **args)
    with pytest.raises(error, match=text):
        stream(target, draft, **args)
    assert target.calls == [] and draft.calls == []
    assert issubclass(error, SSDError)


def test_vocab_mismatch(models):
    target, _ = models
    other = ReferenceModel.random(vocab_size=9, order=1, seed=0)
    with pytest.raises(ConfigError, match="does not match"):
        generate(target, other, prompts=[[1]], mode="sd")
    assert target.calls == []


def test_draft_required_for_speculative_modes(models):
    target, _ = models
    with pytest.raises(ConfigError, match="needs a draft"):
        generate(target, None, prompts=[[1]], mode="ssd")
    assert generate(target, None, prompts=[[1]], mode="ar", max_new_tokens=3).tokens[0]


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        (dict(k=0), "k must be"),
        (dict(k=2, fanout=(1, 2)), "K \\+ 1 = 3"),
        (dict(k=2, fanout=-1), "budget must be >= 0"),
        (dict(k=1, fanout=(1, -1)), "entries must be >= 0"),
        (dict(saguaro_c=0.0), "saguaro_c"),
        (dict(saguaro_c=1.5), "saguaro_c"),
        (dict(saguaro_c=math.nan), "saguaro_c"),
        (dict(fanout_after_backup=(1,)), "fanout_after_backup"),
    ],
)
def test_bad_ssd_config(kwargs, text):
    with pytest.raises(ConfigError, match=text):
        SSDConfig(**kwargs)


def test_unknown_fallback_is_its_own_error():
    with pytest.raises(UnknownOptionError, match="unknown fallback"):
        SSDConfig(fallback="random")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.2), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=-0.5), "min_p"),
        (dict(draft_temperature=-1.0), "draft_temperature"),
        (dict(stop_sequences=[[]]), "empty sequence"),
    ],
)
def test_bad_sampling(kwargs, text):
    with pytest.raises(ConfigError, match=text):
        SamplingParams(**kwargs)


def test_ssd_refuses_a_fanout_the_draft_cannot_hold(models):
    target, draft = models
    draft.max_handles = 10
    with pytest.raises(ConfigError, match="holds at most 10"):
        generate(target, draft, prompts=[[1], [2]], mode="ssd", config=SSDConfig(k=2, fanout=6))
    assert draft.calls == []
    generate(
        target, draft, prompts=[[1]], mode="ssd", max_new_tokens=4, config=SSDConfig(k=2, fanout=6)
    )
