"""PlainLlama (what the GPU check measures) computes what transformers' Llama computes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from backends.torch import LLAMA_1B, LLAMA_8B, LlamaShape, PlainLlama, TorchModel  # noqa: E402

PROMPT = [3, 17, 42, 5, 88, 1, 60]


def _copy_from_hf(hf, shape: LlamaShape) -> PlainLlama:
    mine = PlainLlama(shape, init=False)
    names = {}
    for name, _ in mine.named_parameters():
        theirs = name
        if name.startswith("layers."):
            i, rest = name.split(".", 2)[1:]
            group = (
                "self_attn"
                if rest.split(".")[0] in ("q_proj", "k_proj", "v_proj", "o_proj")
                else "mlp"
                if rest.endswith("proj.weight")
                else None
            )
            theirs = f"model.layers.{i}." + (f"{group}.{rest}" if group else rest)
        elif not name.startswith("lm_head"):
            theirs = "model." + name
        names[name] = theirs
    state = hf.state_dict()
    with torch.no_grad():
        for name, p in mine.named_parameters():
            p.copy_(state[names[name]])
    return mine


@pytest.mark.parametrize("tied", [False, True])
def test_matches_transformers(th, tied):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=th.VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.3,
        tie_word_embeddings=tied,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    shape = LlamaShape(
        vocab_size=th.VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        rope_theta=10000.0,
        rms_eps=1e-6,
        context_size=128,
        tie_embeddings=tied,
    )
    model = TorchModel.from_module(_copy_from_hf(hf, shape))
    ref = TorchModel.from_module(hf)
    a, b = model.open(PROMPT), ref.open(PROMPT)
    ka, kb = model.fork(a, 3), ref.fork(b, 3)
    out = model.extend([(a, [1, 2]), (ka, [9])])
    expected = ref.extend([(b, [1, 2]), (kb, [9])])
    assert torch.allclose(out, expected, atol=1e-5)
    with torch.inference_mode():
        full = hf(input_ids=torch.tensor([PROMPT + [1, 2]])).logits[0, -2:]
    assert torch.allclose(out[:2], full, atol=1e-5)


def test_logits_only_for_the_rows_asked(th):
    shape = LlamaShape(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        context_size=64,
    )
    net = PlainLlama(shape, seed=1)
    rows = []
    net.lm_head.register_forward_hook(lambda m, i, o: rows.append(o.shape[1]))
    model = TorchModel.from_module(net)
    h = model.open(list(range(20)))
    assert model.extend([(h, [1, 2, 3])]).shape == (3, 50)
    assert rows == [3]


def test_presets_have_the_published_sizes():
    assert round(LLAMA_8B.parameters() / 1e9, 2) == 8.03
    assert round(LLAMA_1B.parameters() / 1e9, 2) == 1.24
    assert LLAMA_8B.kv_bytes_per_token(2) == 128 * 1024
