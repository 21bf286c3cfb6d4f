"""A tiny plain-PyTorch causal transformer: the reference for the plain-module signature.

It exists for tests and as a worked example of the pooled plain-module signature (see
:data:`backends.torch.PLAIN_FORWARD_DOC`): pre-norm blocks, rotary-free learned position
embeddings, multi-head attention over a cache object that stores keys and values in the
backend's KV pool. Called with ``past=None`` or per-layer tensors it also follows the
older dense signature (returns ``(logits, new_past)``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["TinyTransformer"]


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(
        self,
        x: torch.Tensor,
        past: Any,
        mask: torch.Tensor,
        layer: int = 0,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, d = x.shape
        hd = d // self.heads
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, hd).transpose(1, 2) for z in (q, k, v))
        if hasattr(past, "update"):  # the backend's KV pool: store, then attend to it
            k, v = past.update(k, v, layer)
        elif past is not None:
            k = torch.cat([past[0], k], dim=-2)
            v = torch.cat([past[1], v], dim=-2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(~mask[:, None, :, :], float("-inf"))
        att = torch.softmax(scores, dim=-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        x = x + self.mlp(self.norm2(x))
        return x, (k, v)


class TinyTransformer(nn.Module):
    """A small random-weight causal LM with the documented plain-module forward.

    Args:
        vocab_size: number of tokens.
        dim: model width (divisible by ``heads``).
        heads: attention heads.
        layers: transformer blocks.
        max_positions: size of the learned position table (the context size).
        seed: weights are drawn from a generator seeded with this.
    """

    #: Declares the pooled forward signature (see ``PLAIN_FORWARD_DOC``).
    kv_pool = True

    def __init__(
        self,
        *,
        vocab_size: int = 64,
        dim: int = 32,
        heads: int = 2,
        layers: int = 2,
        max_positions: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.context_size = max_positions
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_positions, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() > 1 else 0.1))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        past: Any,
        attention_mask: torch.Tensor | None,
    ) -> Any:
        """See :data:`backends.torch.PLAIN_FORWARD_DOC` (both signatures)."""
        x = self.embed(input_ids) + self.pos(positions)
        if hasattr(past, "update"):  # pooled: the mask is complete, [1, T, S]
            for i, block in enumerate(self.blocks):
                x, _ = block(x, past, attention_mask, i)
            return self.head(self.norm(x))
        b, t = input_ids.shape
        p = 0 if past is None else past[0][0].shape[-2]
        # query j (slot p + j) sees key slots <= p + j that hold real tokens
        causal = torch.ones(t, p + t, dtype=torch.bool, device=x.device).tril(diagonal=p)
        mask = causal[None].expand(b, t, p + t)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, :].to(torch.bool)
        new_past = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if past is None else past[i], mask)
            new_past.append(kv)
        return self.head(self.norm(x)), tuple(new_past)
