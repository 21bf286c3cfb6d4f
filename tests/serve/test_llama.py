"""The server on llama.cpp: text prompts, chat through the GGUF's template, stop
strings, and seeded answers equal to generate()'s while other requests run.

Fast tier: the tiny random-weight llama GGUF (a real tokenizer and a ChatML
template). Slow tier: the bundled SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from backends.llama_cpp import LlamaCppModel, from_gguf, smollm2_path  # noqa: E402
from backends.llama_cpp.testing import write_tiny_llama_gguf  # noqa: E402
from backends.ngram import NgramModel  # noqa: E402
from ssd_core import ConfigError, SamplingParams, SSDConfig, generate  # noqa: E402

CONFIG = SSDConfig(k=3, fanout=4)
CHAT = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "the cat"},
    {"role": "assistant", "content": "is on the mat"},
    {"role": "user", "content": "and the dog"},
]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=0)


@pytest.fixture
def tiny(tiny_gguf: Path) -> Iterator[tuple[LlamaCppModel, NgramModel]]:
    target = from_gguf(tiny_gguf, n_threads=1, n_ctx=256, n_seq_max=8)
    draft = NgramModel(vocab_size=target.vocab_size, context_size=256)
    yield target, draft
    target.free()


def _api(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key="x", max_retries=0, timeout=60.0)


def _alone(
    target, draft, ids, *, seed, max_tokens, mode="ssd", **sampling
) -> tuple[list[int], str]:
    params = SamplingParams(**{"temperature": 1.0, **sampling})
    res = generate(target, draft, prompts=[ids], mode=mode, config=CONFIG, sampling=params,
                   max_new_tokens=max_tokens, seed=seed)  # fmt: skip
    return res.tokens[0], res.texts[0]


def test_text_completion_matches_generate(tiny, serve):
    target, draft = tiny
    live = serve(target, draft, config=CONFIG, own_models=False)
    r = _api(live).completions.create(model=target.name, prompt="the cat is", max_tokens=20, seed=9)
    ids = target.tokenizer.encode("the cat is")
    tokens, text = _alone(target, draft, ids, seed=9, max_tokens=20)
    (choice,) = r.choices
    assert choice.model_extra["token_ids"] == tokens
    assert choice.text == text
    assert r.usage.prompt_tokens == len(ids)


def test_chat_matches_generate_streamed_and_not(tiny, serve):
    target, draft = tiny
    live = serve(target, draft, config=CONFIG, own_models=False)
    api = _api(live)
    ids = target.apply_chat_template(CHAT)
    tokens, text = _alone(target, draft, ids, seed=4, max_tokens=24, temperature=0.8)
    r = api.chat.completions.create(model=target.name, messages=CHAT, max_completion_tokens=24,
                                    seed=4, temperature=0.8)  # fmt: skip
    assert r.object == "chat.completion"
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.model_extra["token_ids"] == tokens
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(tokens)
    chunks = list(api.chat.completions.create(model=target.name, messages=CHAT, max_tokens=24,
                                              seed=4, temperature=0.8, stream=True))  # fmt: skip
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    streamed = [t for c in chunks for t in c.choices[0].model_extra.get("token_ids", [])]
    assert streamed == tokens
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_stop_strings_cut_the_text_before_the_match(tiny, serve):
    target, draft = tiny
    live = serve(target, draft, config=CONFIG, own_models=False)
    api = _api(live)
    ids = target.tokenizer.encode("the cat")
    for seed in range(20):  # find a run whose text has a clean 3-character window
        tokens, text = _alone(target, draft, ids, seed=seed, max_tokens=30, temperature=1.0)
        windows = [text[i : i + 3] for i in range(4, len(text) - 3)]
        windows = [w for w in windows if "\ufffd" not in w and w.strip()]
        if windows:
            stop = windows[len(windows) // 2]
            break
    else:
        pytest.fail("no run with a usable stop string")
    cut = text[: text.index(stop)]
    r = api.completions.create(model=target.name, prompt="the cat", max_tokens=30, seed=seed,
                               stop=[stop, "\x00never"])  # fmt: skip
    (choice,) = r.choices
    assert choice.text == cut and choice.finish_reason == "stop"
    assert choice.model_extra["ssd"]["stop"] == stop
    got = choice.model_extra["token_ids"]
    assert got == tokens[: len(got)]  # the tokens end with the one that completed the match
    assert stop in target.tokenizer.decode(got) and stop not in target.tokenizer.decode(got[:-1])
    stream = list(api.completions.create(model=target.name, prompt="the cat", max_tokens=30,
                                         seed=seed, stop=stop, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in stream) == cut


def test_concurrent_seeded_chats_each_match_generate(tiny, serve):
    target, draft = tiny
    live = serve(target, draft, config=CONFIG, own_models=False)
    plans = [
        {"seed": s, "temperature": t, "max_tokens": m, "messages": CHAT[: 2 + (s % 3)]}
        for s, t, m in [(1, 1.0, 30), (2, 0.0, 12), (3, 0.7, 25), (4, 1.2, 18), (5, 1.0, 8)]
    ]
    expected = [
        _alone(target, draft, target.apply_chat_template(p["messages"]), seed=p["seed"],
               max_tokens=p["max_tokens"], temperature=p["temperature"])
        for p in plans
    ]  # fmt: skip

    async def one(api, p):
        text, tokens = "", []
        stream = await api.chat.completions.create(model=target.name, stream=True, **p)
        async for chunk in stream:
            for c in chunk.choices:
                text += c.delta.content or ""
                tokens += c.model_extra.get("token_ids", [])
        return tokens, text

    async def main():
        async with openai.AsyncOpenAI(base_url=live.base_url, api_key="x", max_retries=0,
                                      timeout=60.0) as api:  # fmt: skip
            return await asyncio.wait_for(asyncio.gather(*(one(api, p) for p in plans)), 120)

    assert asyncio.run(main()) == expected
    live.wait_idle()


def test_chat_without_a_template_is_a_400(serve, tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "t.gguf", seed=0)
    target = from_gguf(path, n_threads=1, n_ctx=128, n_seq_max=4)
    target.tokenizer.chat_template = None  # as a GGUF that ships none
    live = serve(target, None, mode="ar")  # the fixture frees the model
    with pytest.raises(openai.BadRequestError, match="chat_template"):
        _api(live).chat.completions.create(model=target.name, messages=CHAT)


# -- the bundled SmolLM2 (slow) -----------------------------------------------------------


@pytest.fixture(scope="module")
def smol() -> Iterator[LlamaCppModel]:
    try:
        path = smollm2_path()
    except ConfigError as exc:
        pytest.skip(str(exc))
    model = from_gguf(path, n_threads=1, n_ctx=512, n_seq_max=4)
    yield model
    model.free()


@pytest.mark.slow
def test_smollm2_chat_through_the_openai_client(smol, serve, client):
    draft = NgramModel(vocab_size=smol.vocab_size, context_size=512)
    live = serve(smol, draft, config=CONFIG, own_models=False, served_model_name="smollm2")
    api = _api(live)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = api.chat.completions.create(model="smollm2", messages=messages, temperature=0,
                                    max_tokens=24)  # fmt: skip
    text = r.choices[0].message.content
    assert text  # a 135M model's answer; what matters is that it is generate()'s
    ids = smol.apply_chat_template(messages)
    assert (r.choices[0].model_extra["token_ids"], text) == _alone(
        smol, draft, ids, seed=0, max_tokens=24, temperature=0.0
    )
    chunks = list(api.chat.completions.create(model="smollm2", messages=messages, temperature=0,
                                              max_tokens=24, stream=True))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    r = api.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                               temperature=0)  # fmt: skip
    assert r.choices[0].text.startswith(" Paris")
    with client(live).stream(
        "POST", "/v1/completions",
        json={"prompt": "Once upon a time", "max_tokens": 40, "seed": 1, "stream": True},
    ) as resp:  # fmt: skip
        payloads = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    final = json.loads(payloads[-2])["choices"][0]
    assert final["finish_reason"] in ("stop", "length")
    assert final["ssd"]["generated_tokens"] > 0
