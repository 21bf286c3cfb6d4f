"""Text in, text out on the onnxruntime backend: ``ssd export-onnx`` writes the tokenizer
beside the graph, the loader finds it (or ``tokenizer=PATH``), the default draft is the
n-gram draft, id-only graphs still take ids."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from backends.onnxruntime import (  # noqa: E402
    BACKEND,
    OrtModel,
    export_pretrained,
    export_tiny_llama,
)
from ssd_core import ConfigError  # noqa: E402
from ssd_core.app.cli import main  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 96
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>"
    "{% endfor %}<|im_start|>assistant"
)


def _tokenizer():
    words = {t: i for i, t in enumerate(SPECIALS)}
    words |= {f"w{i}": i for i in range(len(SPECIALS), VOCAB - 1)}
    words["[UNK]"] = VOCAB - 1
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.decoder = tokenizers.decoders.WordPiece(prefix="##")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random Llama with a tokenizer, saved as a user's model folder."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 2
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def exported(hf_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny-onnx"
    report = export_pretrained(hf_folder, str(out), check=12, threads=1)
    return report


def test_export_writes_the_graph_and_the_tokenizer_beside_it(exported):
    assert exported.path.endswith(os.path.join("tiny-onnx", "model.onnx"))
    assert os.path.isfile(exported.path) and exported.size_bytes > 0
    assert "tokenizer.json" in exported.tokenizer_files
    assert "generation_config.json" in exported.tokenizer_files
    for name in exported.tokenizer_files:
        assert os.path.isfile(os.path.join(exported.folder, name)), name
    assert exported.name == "tiny-llama" and exported.dtype == "float32"
    assert exported.check is not None
    assert exported.check["max_abs_diff"] < 1e-4 and exported.check["top1_agreement"] == 1.0
    assert set(exported.seconds) == {"load", "copy", "export", "tokenizer", "check"}


def test_the_loader_finds_the_tokenizer_beside_the_graph(exported):
    for path in (exported.path, exported.folder):  # the file, or its folder
        m = OrtModel.from_file(path, providers=["CPUExecutionProvider"], threads=1)
        assert m.tokenizer is not None
        assert m.tokenizer.encode("w5 w6") == [5, 6]
        assert m.tokenizer.decode([5, 6]) == "w5 w6"
        assert m.tokenizer.eos_token_ids == (0, 2)  # <|endoftext|>, <|im_end|>
        ids = m.apply_chat_template([{"role": "user", "content": "w5"}])
        assert ids[0] == 1 and ids[2:4] == [5, 2] and ids[4] == 1  # ChatML through the template
    bare = OrtModel.from_file(
        exported.path, providers=["CPUExecutionProvider"], find_tokenizer=False
    )
    assert bare.tokenizer is None
    assert getattr(bare, "apply_chat_template", None) is None


def test_generate_text_in_text_out_with_the_ngram_draft(exported, capsys):
    rc = main(
        ["generate", "--backend", "onnxruntime", "-m", exported.folder, "-n", "6", "-t", "1"]
        + ["--device", "cpu", "--json", "w5 w6 w7"]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, out
    assert isinstance(out["text"], str)
    assert out["draft"].startswith("ngram")
    assert out["usage"]["prompt_tokens"] == 3


def test_generate_matches_across_modes(exported, capsys):
    texts = []
    for mode in ("ar", "ssd"):
        rc = main(
            ["generate", "--backend", "onnxruntime", "-m", exported.path, "-n", "8", "-t", "1"]
            + ["--device", "cpu", "--json", "--mode", mode, "--driver", "sequential", "w9 w4"]
        )
        assert rc == 0
        texts.append(json.loads(capsys.readouterr().out)["tokens"])
    assert texts[0] == texts[1]


def test_tokenizer_key_gives_an_id_only_graph_text(hf_folder, tmp_path, capsys):
    graph = export_tiny_llama(tmp_path / "ids-only.onnx", vocab_size=VOCAB)
    m = BACKEND.load(f"path={graph},tokenizer={hf_folder},providers=CPUExecutionProvider", {})
    assert m.tokenizer is not None and m.tokenizer.encode("w5") == [5]
    with pytest.raises(ConfigError, match="no tokenizer at"):
        BACKEND.load(f"path={graph},tokenizer={tmp_path / 'nowhere'}", {})


def test_id_only_models_still_take_ids(capsys):
    rc = main(
        ["generate", "--backend", "onnxruntime", "--device", "cpu", "-n", "4", "--json", "1 2 3"]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["text"] is None and len(out["tokens"]) == 4
    assert out["draft"].startswith("ngram")
    assert BACKEND.default_draft is not None and BACKEND.default_draft.startswith("ngram:")
    assert BACKEND.default_target == "onnxruntime:tiny-target"


def test_export_onnx_command(hf_folder, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    rc = main(["export-onnx", hf_folder, str(out), "--json", "--check", "6", "-t", "1"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert report["path"] == str(out) and out.is_file()
    assert report["check"]["max_abs_diff"] < 1e-4
    assert (tmp_path / "tokenizer.json").is_file()
    # again without --force: refused before any loading
    rc = main(["export-onnx", hf_folder, str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "exists" in err and "--force" in err


def test_export_onnx_progress_lines(hf_folder, tmp_path, capsys):
    rc = main(["export-onnx", hf_folder, str(tmp_path / "p"), "-t", "1"])
    cap = capsys.readouterr()
    assert rc == 0
    assert cap.out.strip() == str(tmp_path / "p" / "model.onnx")
    for step in ("reading", "copying the weights", "exporting", "writing the tokenizer"):
        assert f"ssd: {step}" in cap.err, cap.err
    assert "run it: ssd generate --backend onnxruntime -m" in cap.err


@pytest.mark.parametrize(
    ("src", "kw", "match"),
    [
        ("/no/such/model", {}, "no model at"),
        ("__file__", {}, "not a .gguf"),
        ("__folder__", {"dtype": "int8"}, "dtype must be one of"),
        ("__folder__", {"dtype": "bfloat16", "check": 4}, "cannot be checked here"),
        ("__folder__", {"check": 1}, "check must be"),
        ("__empty__", {}, "not a transformers model folder"),
    ],
)
def test_export_refuses_bad_input_before_loading(hf_folder, tmp_path, src, kw, match):
    src = {
        "__file__": os.path.join(hf_folder, "config.json"),
        "__folder__": hf_folder,
        "__empty__": str(tmp_path),
    }.get(src, src)
    with pytest.raises(ConfigError, match=match):
        export_pretrained(src, str(tmp_path / "x"), **kw)
    assert not (tmp_path / "x").exists()


def test_float16_export_runs_on_the_cpu_provider(hf_folder, tmp_path):
    report = export_pretrained(hf_folder, str(tmp_path / "h"), dtype="float16", check=8)
    assert report.dtype == "float16"
    assert report.check is not None and report.check["top1_agreement"] >= 0.85
