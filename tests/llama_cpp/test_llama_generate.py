"""The core engine on llama.cpp models: greedy AR == SD == SSD on the tiny GGUF (fast)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.llama_cpp import LlamaCppModel, from_gguf
from backends.llama_cpp.testing import write_tiny_llama_gguf
from backends.ngram import NgramModel
from ssd_core import SamplingParams, SSDConfig, generate

PROMPTS = [[1, 17, 300, 301, 302], [1, 5, 6, 7, 5, 6], [1, 250]]
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def llama_draft(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppModel]:
    path = write_tiny_llama_gguf(tmp_path_factory.mktemp("draft") / "d.gguf", n_layers=1)
    model = from_gguf(path, n_threads=1, n_ctx=256, n_seq_max=64, batch_invariant=False)
    yield model
    model.free()


def run_modes(target: object, draft: object, **kw: object) -> dict[str, list[list[int]]]:
    out = {}
    for mode in ("ar", "sd", "ssd"):
        res = generate(
            target, draft, prompts=PROMPTS, mode=mode, max_new_tokens=40, sampling=GREEDY,
            config=SSDConfig(k=4), seed=0, **kw,
        )  # fmt: skip
        out[mode] = res.tokens
    return out


@pytest.mark.parametrize("driver", ["sequential", "threaded"])
def test_greedy_identity_with_ngram_draft(tiny: LlamaCppModel, driver: str) -> None:
    draft = NgramModel(vocab_size=tiny.vocab_size, max_n=3)
    out = run_modes(tiny, draft, driver=driver)
    assert out["ar"] == out["sd"] == out["ssd"]
    assert all(len(t) == 40 for t in out["ar"])
    assert tiny.open_handles == 0 and draft.open_handles == 0


def test_greedy_identity_with_llama_draft(tiny: LlamaCppModel, llama_draft: LlamaCppModel) -> None:
    out = run_modes(tiny, llama_draft)
    assert out["ar"] == out["sd"] == out["ssd"]
    assert tiny.open_handles == 0 and llama_draft.open_handles == 0


def test_context_size_stops_with_length(tiny_gguf: Path) -> None:
    with from_gguf(tiny_gguf, n_threads=1, n_ctx=24, n_seq_max=4) as target:
        draft = NgramModel(vocab_size=target.vocab_size)
        for mode in ("ar", "sd", "ssd"):
            res = generate(
                target, draft, prompts=[[1] + [5] * 15], mode=mode, max_new_tokens=40,
                sampling=GREEDY, config=SSDConfig(k=4), seed=0,
            )  # fmt: skip
            assert res.finish_reasons == ["length"]
            assert 8 <= len(res.tokens[0]) <= 24 + 1 - 16
        assert target.open_handles == 0


def test_greedy_identity_with_flash_attention_off(tiny_gguf: Path) -> None:
    # flash_attn=off prefills prompts in one batch (llama-cpp-python's way) and decodes
    # everything else one token at a time; every mode opens the prompt the same way.
    with from_gguf(tiny_gguf, n_threads=1, n_ctx=256, flash_attn="off") as target:
        assert target.options.prefill_chunk == 512
        draft = NgramModel(vocab_size=target.vocab_size, max_n=3)
        out = run_modes(target, draft)
        assert out["ar"] == out["sd"] == out["ssd"]
