"""A user's own Hugging Face folder on the torch backend: the default draft follows the
target (the n-gram draft), tokenizer errors name the real cause, ``tokenizer=PATH``,
end-of-generation ids, dtype at load."""

from __future__ import annotations

import json
import logging

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from backends._hf_tokenizer import HFTokenizer, load_hf_tokenizer  # noqa: E402
from backends.torch import BACKEND, TorchModel  # noqa: E402
from ssd_core import ConfigError  # noqa: E402
from ssd_core.app.cli import main  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>"
    "{% endfor %}<|im_start|>assistant"
)


def hf_tokenizer(vocab: int = 96):
    """A word-level tokenizer: specials 0-2 (ChatML), words ``w3``.. , ``[UNK]`` last."""
    words = {t: i for i, t in enumerate(SPECIALS)}
    words |= {f"w{i}": i for i in range(len(SPECIALS), vocab - 1)}
    words["[UNK]"] = vocab - 1
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.decoder = tokenizers.decoders.WordPiece(prefix="##")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = TEMPLATE
    return tok


def tiny_llama(seed: int = 0, vocab: int = 96):
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def save_folder(path, *, tokenizer: bool = True, seed: int = 0):
    model = tiny_llama(seed)
    model.generation_config.eos_token_id = [2, 0]
    model.save_pretrained(path)
    if tokenizer:
        hf_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "full": save_folder(root / "full"),
        "bare": save_folder(root / "bare", tokenizer=False),
    }


def test_the_default_draft_is_the_ngram_draft():
    # any target's vocabulary: never the bundled SmolLM2 (49152 tokens) for a user's model
    assert BACKEND.default_draft is not None and BACKEND.default_draft.startswith("ngram:")


def test_generate_on_a_users_folder_takes_text_and_drafts_with_ngram(folders, capsys):
    rc = main(
        ["generate", "--backend", "torch", "-m", folders["full"], "-n", "6", "-t", "1"]
        + ["--json", "w5 w6 w7"]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, out
    assert out["draft"].startswith("ngram") and out["target"] == "full"
    assert isinstance(out["text"], str) and len(out["tokens"]) >= 1
    assert out["usage"]["prompt_tokens"] == 3


def test_chat_on_a_users_folder_uses_its_template(folders, capsys):
    rc = main(
        ["generate", "--backend", "torch", "-m", folders["full"], "-n", "3", "-t", "1"]
        + ["--json", "--mode", "ar", "--chat", "w5"]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    # <|im_start|> user w5 <|im_end|> <|im_start|> assistant: 6 ids
    assert out["usage"]["prompt_tokens"] == 6


def test_a_folder_without_tokenizer_files_says_so(folders, caplog):
    with caplog.at_level(logging.WARNING, logger="backends.torch"):
        model = BACKEND.load(folders["bare"], {})
    assert model.tokenizer is None
    assert "has no tokenizer files" in caplog.text
    assert "tokenizer.json" in caplog.text and "tokenizer=PATH" in caplog.text
    assert "sentencepiece" not in caplog.text  # transformers' misleading guess
    with pytest.raises(ConfigError, match="has no tokenizer files"):
        load_hf_tokenizer(folders["bare"])


def test_tokenizer_key_reads_another_folders_tokenizer(folders):
    model = BACKEND.load(f"{folders['bare']},tokenizer={folders['full']}", {})
    assert model.tokenizer is not None
    assert model.tokenizer.encode("w5 w9") == [5, 9]
    with pytest.raises(ConfigError, match="no tokenizer at"):
        BACKEND.load(f"{folders['bare']},tokenizer=/no/such/dir", {})


def test_a_sentencepiece_model_without_sentencepiece_names_the_package(tmp_path, monkeypatch):
    import backends._hf_tokenizer as hft

    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    real = hft._missing
    monkeypatch.setattr(hft, "_missing", lambda m: m == "sentencepiece" or real(m))
    with pytest.raises(ConfigError, match=r"tokenizer\.model.*needs sentencepiece"):
        load_hf_tokenizer(str(tmp_path))


def test_unreadable_tokenizer_files_report_transformers_reason_in_one_line(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="transformers cannot read the tokenizer") as err:
        load_hf_tokenizer(str(tmp_path))
    assert "\n" not in str(err.value)


def test_end_of_generation_ids(folders):
    tok = load_hf_tokenizer(folders["full"])
    # EOS <|im_end|> (2), <|endoftext|> (0, llama.cpp treats it as end of generation too),
    # and generation_config's list; never <|im_start|> (1)
    assert tok.eos_token_ids == (0, 2)
    bare = HFTokenizer(hf_tokenizer(), extra_eos=[7])
    assert bare.eos_token_ids == (0, 2, 7)
    # the model's generation_config ids are merged in from_module
    model = TorchModel.from_pretrained(folders["full"])
    assert set(model.tokenizer.eos_token_ids) == {0, 2}


def test_end_of_text_is_hidden_in_the_text(folders, capsys):
    from ssd_core.app.console import Renderer

    tok = load_hf_tokenizer(folders["full"])
    assert Renderer(tok).add([5, 6, 2]) == "w5 w6"
    assert "<|im_end|>" in Renderer(tok, special=True).add([5, 6, 2])


def test_dtype_is_applied_while_loading(folders):
    model = TorchModel.from_pretrained(folders["full"], dtype="bfloat16")
    assert next(model.network.parameters()).dtype == torch.bfloat16
    h = model.open([3, 4])
    assert model.extend([(h, [5])]).dtype == torch.float32
