"""A Hugging Face Llama copied into the exportable module gives the same logits, in ONNX too."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("torch")  # the fixtures are exported from torch

from backends.onnxruntime import export_module, from_hf_llama  # noqa: E402

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.mark.parametrize("tied", [False, True])
def test_hf_llama_to_onnx_matches_transformers(tmp_path, oh, tied):
    config = transformers.LlamaConfig(
        vocab_size=80,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        tie_word_embeddings=tied,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(config).eval()
    tokens = [1, 7, 33, 2, 79, 40, 5, 5, 12]
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([tokens])).logits[0].numpy()
    mine = from_hf_llama(hf)
    got_torch = oh.torch_logits(mine, tokens)
    assert float(np.abs(got_torch - want).max()) < 1e-4
    model = oh.load(export_module(mine, tmp_path / "hf.onnx", name="hf"))
    assert model.context_size == 64
    h = model.open(tokens[:4])
    got = np.concatenate([model.extend([(h, tokens[4:7])]), model.extend([(h, tokens[7:])])])
    diff = float(np.abs(got - want[4:]).max())
    assert diff < 1e-4, diff
