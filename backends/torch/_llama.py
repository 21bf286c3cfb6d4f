"""A plain-PyTorch Llama with the pooled forward signature, built on the device.

For measuring: the GPU check builds random-weight Llama-3.1-8B- and Llama-3.2-1B-shaped
models with it directly on the GPU (speed does not depend on weight values), with no
transformers, no download and no host copy of the weights. The computation is the
Llama decoder (RMSNorm, rotary embeddings from absolute positions, grouped-query
attention, SwiGLU MLP); ``tests/torch/test_llama.py`` checks it against transformers'
``LlamaForCausalLM`` with the same weights. Rope scaling is not implemented (it changes
values, not speed).

Grouped-query attention reads the KV pool without expanding it: the query heads that
share a KV head are stacked along the query axis, so keys and values are read once per
KV head and never copied (the mask is repeated instead, ``group x T x S`` booleans).
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
from torch import nn

__all__ = ["LLAMA_1B", "LLAMA_8B", "LlamaShape", "PlainLlama"]


@attrs.frozen(kw_only=True)
class LlamaShape:
    """The sizes of a Llama decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 500000.0
    rms_eps: float = 1e-5
    context_size: int = 8192
    tie_embeddings: bool = False

    def parameters(self) -> int:
        """Number of weights."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * h * i + 2 * h
        heads = 1 if self.tie_embeddings else 2
        return self.num_layers * per_layer + heads * self.vocab_size * h + h

    def kv_bytes_per_token(self, element_size: int) -> int:
        """K+V bytes one token occupies over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size


#: Llama-3.1-8B's shape.
LLAMA_8B = LlamaShape(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
)
#: Llama-3.2-1B's shape (tied embeddings).
LLAMA_1B = LlamaShape(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    tie_embeddings=True,
)


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, **factory: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **factory))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class _Layer(nn.Module):
    def __init__(self, s: LlamaShape, **factory: Any) -> None:
        super().__init__()
        h, d = s.hidden_size, s.head_dim
        self.shape = s
        self.input_layernorm = _RMSNorm(h, s.rms_eps, **factory)
        self.q_proj = nn.Linear(h, s.num_heads * d, bias=False, **factory)
        self.k_proj = nn.Linear(h, s.num_kv_heads * d, bias=False, **factory)
        self.v_proj = nn.Linear(h, s.num_kv_heads * d, bias=False, **factory)
        self.o_proj = nn.Linear(s.num_heads * d, h, bias=False, **factory)
        self.post_attention_layernorm = _RMSNorm(h, s.rms_eps, **factory)
        self.gate_proj = nn.Linear(h, s.intermediate_size, bias=False, **factory)
        self.up_proj = nn.Linear(h, s.intermediate_size, bias=False, **factory)
        self.down_proj = nn.Linear(s.intermediate_size, h, bias=False, **factory)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past: Any,
        mask: torch.Tensor,
        index: int,
    ) -> torch.Tensor:
        s = self.shape
        b, t, _ = x.shape
        hkv, group, d = s.num_kv_heads, s.num_heads // s.num_kv_heads, s.head_dim
        y = self.input_layernorm(x)
        q = self.q_proj(y).view(b, t, s.num_heads, d).transpose(1, 2)
        k = self.k_proj(y).view(b, t, hkv, d).transpose(1, 2)
        v = self.v_proj(y).view(b, t, hkv, d).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys, values = past.update(k, v, index)
        # [b, hkv * group, t, d] -> [b, hkv, group * t, d]: each KV head read once
        q = q.reshape(b, hkv, group * t, d)
        att = torch.nn.functional.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=1.0 / math.sqrt(d)
        )
        att = att.reshape(b, s.num_heads, t, d).transpose(1, 2).reshape(b, t, s.num_heads * d)
        x = x + self.o_proj(att)
        y = self.post_attention_layernorm(x)
        x = x + self.down_proj(nn.functional.silu(self.gate_proj(y)) * self.up_proj(y))
        return x


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class PlainLlama(nn.Module):
    """A Llama decoder with the pooled plain-module signature (``kv_pool = True``).

    Args:
        shape: the sizes (:data:`LLAMA_8B`, :data:`LLAMA_1B` or your own).
        device: where to build the weights (directly: nothing is built on the host).
        dtype: weight dtype.
        seed: random weights from a generator on ``device`` seeded with this; each
            matrix is scaled by ``1/sqrt(fan_in)`` so activations and logits stay O(1).
        init: ``False`` leaves the weights uninitialised (load them yourself).
    """

    kv_pool = True

    def __init__(
        self,
        shape: LlamaShape,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        init: bool = True,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": torch.device(device), "dtype": dtype}
        self.shape = shape
        self.vocab_size = shape.vocab_size
        self.context_size = shape.context_size
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size, **factory)
        self.layers = nn.ModuleList(_Layer(shape, **factory) for _ in range(shape.num_layers))
        self.norm = _RMSNorm(shape.hidden_size, shape.rms_eps, **factory)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False, **factory)
        if shape.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv = 1.0 / (
            shape.rope_theta
            ** (
                torch.arange(0, shape.head_dim, 2, dtype=torch.float32, device=factory["device"])
                / shape.head_dim
            )
        )
        self.register_buffer("inv_freq", inv, persistent=False)
        if init:
            self.randomize(seed)
        self.eval()

    @torch.no_grad()
    def randomize(self, seed: int) -> None:
        """Fill the weights with seeded random values, on their device."""
        dev = self.embed_tokens.weight.device
        gen = torch.Generator(device=dev).manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            elif p.dim() == 2:
                std = 1.0 if name.startswith("embed_tokens") else 1.0 / math.sqrt(p.shape[1])
                p.normal_(0.0, std, generator=gen)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        past: Any,
        attention_mask: torch.Tensor,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """See :data:`backends.torch.PLAIN_FORWARD_DOC` (pooled signature)."""
        x = self.embed_tokens(input_ids)
        inv_freq: torch.Tensor = self.inv_freq  # type: ignore[assignment]
        freqs = positions.to(torch.float32)[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[:, None].to(x.dtype), emb.sin()[:, None].to(x.dtype)
        group = self.shape.num_heads // self.shape.num_kv_heads
        # [1, T, S] -> [1, 1, group * T, S], matching the stacked query heads
        mask = attention_mask[:, None].repeat(1, 1, group, 1)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, past, mask, i)
        if logits_to_keep:
            x = x[:, x.shape[1] - logits_to_keep :]
        logits: torch.Tensor = self.lm_head(self.norm(x))
        return logits
