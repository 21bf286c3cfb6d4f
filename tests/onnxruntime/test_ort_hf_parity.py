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


def _tokens_and_want(hf, tokens):
    with torch.no_grad():
        return hf(input_ids=torch.tensor([tokens])).logits[0].float().numpy()


TOKENS = [1, 7, 33, 2, 79, 40, 5, 5, 12, 60, 3]


def _llama(**extra):
    config = transformers.LlamaConfig(
        vocab_size=80,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        rms_norm_eps=1e-5,
        **extra,
    )
    torch.manual_seed(5)
    return transformers.LlamaForCausalLM(config).eval()


def _through_onnx(oh, module, path, tokens, **load):
    model = oh.load(export_module(module, path, name="m"), **load)
    h = model.open(tokens[:4])
    return np.concatenate(
        [np.asarray(model.extend([(h, tokens[4:8])])), np.asarray(model.extend([(h, tokens[8:])]))]
    )


@pytest.mark.parametrize(
    "rope",
    [
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
            "rope_theta": 500000.0,
        },
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    ],
)
def test_rope_scaling(tmp_path, oh, rope):
    """Llama-3-style scaling (short original context, so every band is exercised)."""
    from backends.onnxruntime import build_tiny_llama
    from backends.onnxruntime._export import rope_frequencies

    hf = _llama(rope_scaling=dict(rope))
    theta = rope["rope_theta"]
    ours = rope_frequencies(8, theta, rope)
    assert torch.allclose(ours, hf.model.rotary_emb.inv_freq.float(), rtol=1e-6)
    plain = rope_frequencies(8, theta)
    assert not torch.allclose(ours, plain)  # the scaling really changes the table
    want = _tokens_and_want(hf, TOKENS)
    mine = from_hf_llama(hf)
    assert float(np.abs(oh.torch_logits(mine, TOKENS) - want).max()) < 1e-4
    got = _through_onnx(oh, mine, tmp_path / "rope.onnx", TOKENS)
    assert float(np.abs(got - want[4:]).max()) < 1e-4
    # build_tiny_llama computes the same table from the config dict itself
    built = build_tiny_llama(hidden_size=32, num_heads=4, rope_theta=theta, rope_scaling=rope)
    assert torch.allclose(built.inv_freq, ours)


def test_qwen2_biases(tmp_path, oh):
    config = transformers.Qwen2Config(
        vocab_size=80,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(6)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # random biases (transformers initialises them to zero)
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    want = _tokens_and_want(hf, TOKENS)
    mine = from_hf_llama(hf)
    layer = mine.layers[0]
    assert layer.q.bias is not None and layer.o.bias is None and layer.gate.bias is None
    assert float(np.abs(oh.torch_logits(mine, TOKENS) - want).max()) < 1e-4
    got = _through_onnx(oh, mine, tmp_path / "qwen2.onnx", TOKENS)
    assert float(np.abs(got - want[4:]).max()) < 1e-4


def test_llama_attention_and_mlp_bias_and_head_dim(tmp_path, oh):
    hf = _llama(attention_bias=True, mlp_bias=True, head_dim=16)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    want = _tokens_and_want(hf, TOKENS)
    mine = from_hf_llama(hf)
    assert mine.head_dim == 16 and mine.layers[0].o.bias is not None
    got = _through_onnx(oh, mine, tmp_path / "bias.onnx", TOKENS)
    assert float(np.abs(got - want[4:]).max()) < 1e-4


def test_float16_export_runs_on_the_cpu_provider(tmp_path, oh):
    hf = _llama()
    want = _tokens_and_want(hf, TOKENS)
    half = from_hf_llama(hf, dtype="float16")
    assert next(half.parameters()).dtype == torch.float16
    path = export_module(half, tmp_path / "fp16.onnx", name="fp16")
    model = oh.load(path)
    assert model.signature.kv_type == "float16" and model.signature.logits_type == "float16"
    got = _through_onnx(oh, half, tmp_path / "fp16b.onnx", TOKENS)
    assert got.dtype == np.float32  # handed to the core as float32
    # against the float32 transformers model, to float16 precision
    assert float(np.abs(got - want[4:]).max()) < 5e-2
    assert (got.argmax(-1) == want[4:].argmax(-1)).mean() >= 0.85
    # and on torch buffers (the CUDA path's code) the same
    dev = _through_onnx(
        oh, half, tmp_path / "fp16c.onnx", TOKENS, io_binding=True, kv_on_device=True
    )
    np.testing.assert_allclose(dev, got, atol=1e-3, rtol=0)


def test_bfloat16_export_checked_with_the_onnx_reference_evaluator(tmp_path, oh):
    """onnxruntime's CPU provider has no bfloat16 matmul (the graph is for CUDA), so the
    exported graph is run by onnx's reference evaluator and compared with torch."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import onnx
    from onnx.reference import ReferenceEvaluator

    hf = _llama()
    want = _tokens_and_want(hf, TOKENS)
    bf = from_hf_llama(hf, dtype="bfloat16")
    path = export_module(bf, tmp_path / "bf16.onnx", name="bf16")
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    kinds = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    assert kinds["past_key_values.0.key"] == onnx.TensorProto.BFLOAT16
    n = len(TOKENS)
    feeds = {
        "input_ids": np.array([TOKENS], dtype=np.int64),
        "attention_mask": np.ones((1, n), dtype=np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None],
    }
    for i in range(2):
        for part in ("key", "value"):
            feeds[f"past_key_values.{i}.{part}"] = np.zeros((1, 2, 0, 8), dtype=ml_dtypes.bfloat16)
    got = ReferenceEvaluator(proto).run(["logits"], feeds)[0][0].astype(np.float32)
    with torch.no_grad():
        ref = (
            bf(
                *[
                    torch.tensor([TOKENS]),
                    torch.ones((1, n), dtype=torch.int64),
                    torch.arange(n)[None],
                    *[torch.zeros((1, 2, 0, 8), dtype=torch.bfloat16)] * 4,
                ]
            )[0][0]
            .float()
            .numpy()
        )
    assert float(np.abs(got - ref).max()) < 0.1  # two bfloat16 evaluations, op by op
    assert float(np.abs(got - want).max()) < 0.25  # bfloat16 vs the float32 original
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


def test_unsupported_rope_and_attention_are_refused():
    from backends.onnxruntime._export import rope_frequencies
    from ssd_core import ConfigError

    with pytest.raises(ConfigError):
        rope_frequencies(8, 1e4, {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ConfigError):
        rope_frequencies(8, 1e4, {"rope_type": "llama3", "factor": 2.0})
    with pytest.raises(ConfigError):
        from_hf_llama(
            _llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
        )
