"""The tokenizer wrapper and CLI-facing options, with an in-memory HF tokenizer."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from backends.torch import BACKEND, HFTokenizer, TorchModel  # noqa: E402


def _hf_tokenizer(vocab: int = 96, chat: bool = True):
    words = {f"w{i}": i for i in range(vocab - 1)} | {"[UNK]": vocab - 1}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", eos_token="w2"
    )
    if chat:
        tok.chat_template = "{% for m in messages %}w7 {{ m['content'] }} w8 {% endfor %}w9"
    return tok


def test_wrapper_roundtrip_and_eos(th):
    model = TorchModel.from_module(th.tiny_llama(0), tokenizer=_hf_tokenizer())
    tok = model.tokenizer
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode("w5 w6 w40")
    assert ids == [5, 6, 40]
    assert tok.decode(ids) == "w5 w6 w40"
    assert 2 in tok.eos_token_ids
    h = model.open(ids)
    assert model.extend([(h, [1])]).shape == (1, th.VOCAB)


def test_chat_template(th):
    model = TorchModel.from_module(th.tiny_llama(0), tokenizer=_hf_tokenizer())
    assert model.apply_chat_template([{"role": "user", "content": "w5 w6"}]) == [7, 5, 6, 8, 9]
    bare = TorchModel.from_module(th.tiny_llama(0), tokenizer=_hf_tokenizer(chat=False))
    assert getattr(bare, "apply_chat_template", None) is None
    assert getattr(TorchModel.from_module(th.tiny_llama(0)), "apply_chat_template", None) is None


def test_cli_options():
    model = BACKEND.load("tiny,vocab=40", {"n_ctx": 50, "role": "target", "threads": None})
    assert model.context_size == 50 and model.vocab_size == 40
