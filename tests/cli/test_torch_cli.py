"""Torch's tokenizer keeps special tokens in its text; the command line hides the end of
text there exactly as it does on llama.cpp (and shows it with ``--special``)."""

from __future__ import annotations

import pytest

from ssd_core.app.console import Renderer

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from backends.torch import HFTokenizer  # noqa: E402


def _hf_tokenizer():
    words = {w: i for i, w in enumerate(["[UNK]", "hello", "there", "<|im_end|>"])}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", eos_token="<|im_end|>"
    )
    return HFTokenizer(tok)


def test_end_of_text_hidden_on_torch_unless_special():
    tok = _hf_tokenizer()
    ids = tok.encode("hello there")
    eos = tok.eos_token_ids[0]
    assert "<|im_end|>" in tok.decode([*ids, eos])  # what torch itself prints
    r = Renderer(tok)
    assert r.add([*ids, eos]) + r.finish() == tok.decode(ids)
    r = Renderer(tok, special=True)
    assert (r.add([*ids, eos]) + r.finish()).endswith("<|im_end|>")
