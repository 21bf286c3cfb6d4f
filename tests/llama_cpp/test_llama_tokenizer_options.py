"""Tokenizer, chat template, options and registry of the llama.cpp backend (fast tier)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.llama_cpp import LlamaCppModel, LlamaOptions, from_gguf
from ssd_core import ConfigError, InputError, Tokenizer
from ssd_core.app import load_backend


def test_tokenizer_round_trip(tiny: LlamaCppModel) -> None:
    tok = tiny.tokenizer
    assert isinstance(tok, Tokenizer)
    ids = tok.encode("the cat is on a word")
    assert ids[0] == 1  # BOS, as the GGUF asks
    assert tok.decode(ids).strip() == "the cat is on a word"
    assert tok.encode("the", add_special_tokens=False)[0] != 1
    with pytest.raises(InputError):
        tok.decode([10_000])


def test_eos_ids_include_eos_and_eot(tiny: LlamaCppModel) -> None:
    assert {2, 4} <= set(tiny.tokenizer.eos_token_ids)


def test_chat_template_from_gguf(tiny: LlamaCppModel) -> None:
    tok = tiny.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == 3 and 4 in ids  # special tokens parsed to their ids


def test_options_validation() -> None:
    assert LlamaOptions().batch_invariant
    assert LlamaOptions().decode_chunk == 63
    assert not LlamaOptions().unified and LlamaOptions(batch_invariant=False).unified
    assert LlamaOptions(n_ctx=100, n_seq_max=3).kv_cells == 300
    assert LlamaOptions(flash_attn="off").decode_chunk == 1
    assert LlamaOptions(batch_invariant=False).decode_chunk == 512
    assert LlamaOptions.from_mapping({"threads": 3, "context_size": 99, "device": "x"}).n_ctx == 99
    with pytest.raises(ConfigError):
        LlamaOptions(flash_attn="maybe")
    with pytest.raises(ConfigError):
        LlamaOptions(n_ctx=0)
    with pytest.raises(ConfigError):
        LlamaOptions.from_mapping({"bogus": 1}, strict=True)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        from_gguf(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(ConfigError):
        from_gguf(bad)


def test_registry_loads_by_spec(tiny_gguf: Path) -> None:
    spec = load_backend("llama_cpp")
    assert spec.default_target == "llama_cpp:smollm2"
    model = spec.load(str(tiny_gguf), {"n_threads": 1, "context_size": 128, "unrelated": 1})
    try:
        assert model.context_size == 128
        h = model.open([1, 2])
        assert model.extend([(h, [3])]).shape == (1, 324)
    finally:
        model.free()


def test_model_level_chat_template_gives_ids(tiny: LlamaCppModel) -> None:
    ids = tiny.apply_chat_template([{"role": "user", "content": "hi"}])
    text = tiny.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids == tiny.tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == 3


def test_draft_role_defaults(tiny_gguf: Path) -> None:
    spec = load_backend("llama_cpp")
    draft = spec.load(str(tiny_gguf), {"role": "draft", "threads": 1, "n_ctx": 64})
    target = spec.load(str(tiny_gguf), {"role": "target", "threads": 1, "n_ctx": 64})
    try:
        assert draft.options.unified and draft.options.n_seq_max == 64  # type: ignore[attr-defined]
        assert not target.options.unified  # type: ignore[attr-defined]
    finally:
        draft.free()  # type: ignore[attr-defined]
        target.free()  # type: ignore[attr-defined]
