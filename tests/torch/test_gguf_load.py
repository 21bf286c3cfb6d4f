"""Loading a GGUF through transformers parses the file once and gives the same model."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from backends.llama_cpp.testing import write_tiny_llama_gguf  # noqa: E402
from backends.torch import TorchModel, load_pretrained  # noqa: E402
from backends.torch._gguf import fast_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return str(write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf"))


@pytest.fixture
def parses(monkeypatch):
    """Counts full GGUF parses (GGUFReader.__init__ runs)."""
    count = {"n": 0}
    real = gguf.GGUFReader.__init__

    def counting(self, *args, **kwargs):
        count["n"] += 1
        real(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counting)
    return count


def _load_plain(path):
    import os

    folder, name = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tok


def test_one_parse_and_the_same_weights_config_and_tokenizer(tiny_gguf, parses):
    plain_model, plain_tok = _load_plain(tiny_gguf)
    assert parses["n"] == 3  # config, weights, tokenizer: what transformers does alone
    parses["n"] = 0
    model, tok, name = load_pretrained(tiny_gguf, progress_bars=False)
    assert parses["n"] == 1
    assert name == "tiny.gguf"
    assert model.config.to_dict() == plain_model.config.to_dict()
    mine, theirs = model.state_dict(), plain_model.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    text = "the cat is on the mat"
    assert tok.encode(text) == list(plain_tok.encode(text))
    assert tok.eos_token_ids == (2, 4)  # EOS and <|im_end|>, as llama.cpp reads this file


def test_the_patches_are_undone_after_the_load(tiny_gguf):
    import transformers.modeling_gguf_pytorch_utils as mg

    before = (gguf.GGUFReader, gguf.get_tensor_name_map, mg.load_gguf_checkpoint, mg.tqdm)
    with fast_gguf():
        assert gguf.GGUFReader is not before[0]
        with fast_gguf():  # re-entrant
            pass
        assert gguf.GGUFReader is not before[0]
    assert (gguf.GGUFReader, gguf.get_tensor_name_map, mg.load_gguf_checkpoint, mg.tqdm) == before
    TorchModel.from_pretrained(tiny_gguf, progress_bars=False)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map, mg.load_gguf_checkpoint, mg.tqdm) == before


def test_no_progress_bars_without_verbose(tiny_gguf, capfd):
    load_pretrained(tiny_gguf, progress_bars=False)
    err = capfd.readouterr().err
    assert "de-quantizing" not in err and "Loading weights" not in err


def test_cli_loads_show_transformers_bars_only_with_verbose(tiny_gguf, capfd):
    from backends.torch import _RECENT, BACKEND

    _RECENT.clear()
    BACKEND.load(tiny_gguf, {"verbose": False})
    assert "de-quantizing" not in capfd.readouterr().err
    _RECENT.clear()
    BACKEND.load(tiny_gguf, {"verbose": True})
    assert "de-quantizing" in capfd.readouterr().err
