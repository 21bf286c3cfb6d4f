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
    ids = tok.encode(text, add_special_tokens=False, parse_special=True)
    assert ids[0] == 3 and 4 in ids  # special tokens parsed to their ids when asked
    plain = tok.encode(text, add_special_tokens=False)
    assert 3 not in plain and 4 not in plain  # by default text stays text


def test_options_validation() -> None:
    assert LlamaOptions().batch_invariant
    assert LlamaOptions().decode_chunk == 63
    assert not LlamaOptions().unified and LlamaOptions(batch_invariant=False).unified
    # per_sequence: one slot at load (256 cells: llama.cpp pads streams), 3 at most.
    assert LlamaOptions(n_ctx=100, n_seq_max=3).kv_cells == 256
    assert LlamaOptions(n_ctx=300, n_seq_max=3).max_kv_cells == 3 * 512
    assert LlamaOptions(n_ctx=300, n_seq_max=3, n_seq=2).kv_cells == 2 * 512
    assert LlamaOptions(batch_invariant=False, n_seq_max=3).initial_slots == 3
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
    assert ids == tiny.tokenizer.encode(text, add_special_tokens=False, parse_special=True)
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


def test_new_options_validation() -> None:
    assert LlamaOptions().prefill_chunk == 63  # flash attention auto: the decode chunk
    assert LlamaOptions(flash_attn="off").prefill_chunk == 512  # one batch, as Llama(...)
    assert LlamaOptions(flash_attn="off", prefill_batch=8).prefill_chunk == 8
    assert LlamaOptions().ubatch == 63 and LlamaOptions(flash_attn="off").ubatch == 512
    assert LlamaOptions(allow_special="yes").allow_special
    with pytest.raises(ConfigError):
        LlamaOptions(allow_special="maybe")
    with pytest.raises(ConfigError):
        LlamaOptions(n_seq=0)


def test_registry_passes_the_new_options(tiny_gguf: Path) -> None:
    spec = load_backend("llama_cpp")
    model = spec.load(
        str(tiny_gguf),
        {"role": "target", "threads": 1, "n_ctx": 64, "n_seq": 2, "flash_attn": "off",
         "allow_special": "yes", "device": "cpu"},
    )  # fmt: skip
    try:
        assert model.slots == 2 and model.options.flash_attn == "off"  # type: ignore[attr-defined]
        assert 3 in model.tokenizer.encode("<|im_start|>")  # type: ignore[union-attr]
    finally:
        model.free()  # type: ignore[attr-defined]
