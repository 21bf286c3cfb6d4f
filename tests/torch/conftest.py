"""Fixtures for the torch backend tests: tiny random-weight models, no downloads."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from backends.torch import TinyTransformer, TorchModel  # noqa: E402

# One intra-op thread: these models are tiny, and on a small shared machine OpenMP's
# spin-waiting threads make each op ~60x slower under contention (measured: SDPA on a
# 36x4x1x40 batch, 15 ms with 2 threads and other work running, 0.23 ms with 1).
torch.set_num_threads(1)

VOCAB = 96


def tiny_llama(
    seed: int = 0, *, vocab: int = VOCAB, layers: int = 2, scale: float = 0.3, context: int = 128
):
    """A random LlamaForCausalLM built from a config; ``scale`` sharpens its logits."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        initializer_range=scale,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def make_model(kind: str, seed: int = 0, **kw) -> TorchModel:
    """``kind`` is ``"llama"`` (Hugging Face) or ``"plain"`` (TinyTransformer)."""
    if kind == "llama":
        return TorchModel.from_module(tiny_llama(seed), **kw)
    return TorchModel.from_module(
        TinyTransformer(vocab_size=VOCAB, seed=seed, max_positions=128), **kw
    )


def full_logits(model: TorchModel, tokens: list[int]):
    """Logits for every position of ``tokens`` from one cache-free forward of the network."""
    net = model.network
    with torch.inference_mode():
        ids = torch.tensor([tokens], device=model.device)
        if hasattr(net, "config"):
            out = net(input_ids=ids).logits
        else:
            pos = torch.arange(len(tokens), device=model.device)[None]
            out = net(ids, pos, None, None)[0]
    return out[0].float()


@pytest.fixture(params=["llama", "plain"])
def kind(request) -> str:
    return request.param


class Helpers:
    """Test helpers handed out as a fixture (test folders here are not packages)."""

    VOCAB = VOCAB
    tiny_llama = staticmethod(tiny_llama)
    make_model = staticmethod(make_model)
    full_logits = staticmethod(full_logits)


@pytest.fixture
def th() -> type[Helpers]:
    return Helpers
