"""The official ``openai`` client against a live server on the reference backend
(id-only: token-id prompts; chat is refused with a clear 400)."""

from __future__ import annotations

import openai
import pytest

from ssd_core import SamplingParams, SSDConfig, generate
from ssd_core.app.serve import RequestDefaults

CONFIG = SSDConfig(k=3, fanout=6)


def _client(live, **kw):
    return openai.OpenAI(base_url=live.base_url, api_key=kw.pop("api_key", "none"), max_retries=0,
                         timeout=30.0, **kw)  # fmt: skip


def _alone(live, prompt, *, n=1, seed, max_tokens, mode="ssd", **sampling):
    """The same request through generate(), with nothing else in flight."""
    params = SamplingParams(**{"temperature": 1.0, **sampling})
    res = generate(live.target, live.draft, prompts=[prompt] * n, mode=mode, config=CONFIG,
                   sampling=params, max_new_tokens=max_tokens, seed=seed)  # fmt: skip
    return res.tokens


def test_completion_with_token_ids_matches_generate(serve):
    live = serve()
    c = _client(live)
    r = c.completions.create(model="reference", prompt=[1, 2, 3], max_tokens=12, seed=7)
    assert r.object == "text_completion" and r.model == "reference"
    (choice,) = r.choices
    ids = choice.model_extra["token_ids"]
    assert ids == _alone(live, [1, 2, 3], seed=7, max_tokens=12)[0]
    assert choice.text == " ".join(map(str, ids))
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == 15
    ssd = choice.model_extra["ssd"]
    assert ssd["generated_tokens"] == 12 and ssd["prompt_tokens"] == 3
    assert 0.0 <= ssd["acceptance_per_token"] <= 1.0 and ssd["total_s"] > 0


def test_streamed_completion_matches_the_unstreamed_one(serve):
    live = serve()
    c = _client(live)
    whole = c.completions.create(model="reference", prompt=[4, 5], max_tokens=20, seed=3)
    chunks = list(c.completions.create(model="reference", prompt=[4, 5], max_tokens=20, seed=3,
                                       stream=True, stream_options={"include_usage": True}))  # fmt: skip
    ids = [
        t for ch in chunks for choice in ch.choices for t in choice.model_extra.get("token_ids", [])
    ]
    assert ids == whole.choices[0].model_extra["token_ids"]
    assert "".join(choice.text for ch in chunks for choice in ch.choices) == whole.choices[0].text
    finals = [choice for ch in chunks for choice in ch.choices if choice.finish_reason]
    assert [f.finish_reason for f in finals] == ["length"]
    assert finals[0].model_extra["ssd"]["generated_tokens"] == 20
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(ch.object == "text_completion" and ch.id == chunks[0].id for ch in chunks)


def test_n_and_a_batch_of_prompts(serve):
    live = serve()
    c = _client(live)
    r = c.completions.create(model="reference", prompt=[[1, 2], [3, 4, 5]], n=2, max_tokens=6,
                             seed=11, temperature=0.8, extra_body={"top_k": 20, "min_p": 0.01})  # fmt: skip
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    # Choice i draws from stream (seed, i), as prompt i of generate() does.
    ref = generate(live.target, live.draft, prompts=[[1, 2], [1, 2], [3, 4, 5], [3, 4, 5]],
                   config=CONFIG, sampling=SamplingParams(temperature=0.8, top_k=20, min_p=0.01),
                   max_new_tokens=6, seed=11).tokens  # fmt: skip
    assert [ch.model_extra["token_ids"] for ch in r.choices] == ref
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 24


def test_greedy_modes_agree_through_the_server(serve):
    outs = []
    for mode in ("ar", "sd", "ssd"):
        live = serve(mode=mode)
        r = _client(live).completions.create(model="reference", prompt=[9, 8, 7], max_tokens=16,
                                             temperature=0)  # fmt: skip
        outs.append(r.choices[0].model_extra["token_ids"])
    assert outs[0] == outs[1] == outs[2]


def test_chat_is_refused_cleanly_for_an_id_only_model(serve):
    live = serve()
    c = _client(live)
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="reference", messages=[{"role": "user", "content": "hi"}])
    body = err.value.body
    assert err.value.status_code == 400
    assert body["code"] == "chat_not_supported" and body["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="no tokenizer"):
        c.completions.create(model="reference", prompt="some text")
    with pytest.raises(openai.BadRequestError, match="tokenizer"):
        c.completions.create(model="reference", prompt=[1, 2], stop=["x"])


def test_models_lists_the_served_name(serve):
    live = serve(served_model_name="my-model")
    c = _client(live)
    (m,) = c.models.list().data
    assert m.id == "my-model" and m.object == "model"
    assert m.model_extra["ssd"]["mode"] == "ssd" and m.model_extra["ssd"]["k"] == 3
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="reference", prompt=[1])
    r = c.completions.create(model="my-model", prompt=[1], max_tokens=2)
    assert r.model == "my-model"


def test_api_key(serve):
    live = serve(api_key="sesame")
    with pytest.raises(openai.AuthenticationError):
        _client(live, api_key="wrong").models.list()
    assert _client(live, api_key="sesame").models.list().data


def test_server_defaults_fill_what_a_request_leaves_out(serve):
    live = serve(defaults=RequestDefaults(temperature=0.0, max_tokens=5))
    r = _client(live).completions.create(model="reference", prompt=[1, 2, 3])
    ids = r.choices[0].model_extra["token_ids"]
    assert len(ids) == 5
    assert ids == _alone(live, [1, 2, 3], seed=0, max_tokens=5, temperature=0.0)[0]


def test_max_completion_tokens_and_zero(serve):
    live = serve()
    c = _client(live)
    r = c.completions.create(model="reference", prompt=[1], max_tokens=0)
    assert r.choices[0].model_extra["token_ids"] == [] and r.choices[0].finish_reason == "length"
    r = c.completions.create(model="reference", prompt=[1], extra_body={"max_completion_tokens": 3})
    assert r.usage.completion_tokens == 3


def test_stop_token_ids_end_a_choice_on_an_id_only_model(serve):
    live = serve()
    c = _client(live)
    full = c.completions.create(model="reference", prompt=[2, 3], max_tokens=20, seed=8)
    ids = full.choices[0].model_extra["token_ids"]
    stop = ids[5]
    first = ids.index(stop)
    r = c.completions.create(model="reference", prompt=[2, 3], max_tokens=20, seed=8,
                             extra_body={"stop_token_ids": [stop]})  # fmt: skip
    (choice,) = r.choices
    assert choice.model_extra["token_ids"] == ids[: first + 1]  # kept, as vLLM does
    assert choice.finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        c.completions.create(model="reference", prompt=[2], extra_body={"stop_token_ids": [64]})
