"""Forward adapters: one batched forward pass over explicit KV tensors.

The backend keeps every handle's KV state itself, as a tuple with one ``(keys,
values)`` pair per layer, each shaped ``[1, heads, length, head_dim]`` (the sequence
axis is ``-2``). A *runner* turns a padded batch of such states plus new tokens into
logits and the grown states. Two runners exist:

* :class:`HFRunner` wraps a Hugging Face causal LM. It builds a fresh
  ``DynamicCache`` from the tensors with the public ``Cache.update`` (present in every
  transformers release the ``[torch]`` extra allows), passes it under the keyword the
  installed version uses (``cache`` in 5.x, ``past_key_values`` in 4.x) and reads the
  grown tensors back.
* :class:`ModuleRunner` wraps a plain ``nn.Module`` with the signature documented in
  :data:`PLAIN_FORWARD_DOC` (see :class:`~backends.torch.TinyTransformer`).

Runners never write into a tensor they were given: growing a state makes new tensors,
so handles can share prefixes by holding views (cheap forks).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["KV", "PLAIN_FORWARD_DOC", "HFRunner", "ModuleRunner", "Runner"]

#: Per-layer ``(keys, values)``, each ``[batch, heads, length, head_dim]``.
KV = tuple[tuple[torch.Tensor, torch.Tensor], ...]

PLAIN_FORWARD_DOC = """\
``module(input_ids, positions, past, attention_mask) -> (logits, new_past)``

* ``input_ids``: ``LongTensor[B, T]``, the new tokens (right-padded rows hold junk).
* ``positions``: ``LongTensor[B, T]``, the absolute position of every new token.
* ``past``: ``None`` (nothing cached) or a sequence with one ``(keys, values)`` pair per
  layer, each ``[B, heads, P, head_dim]``; the module must not modify them in place.
* ``attention_mask``: ``None`` (every row is full and causal) or ``BoolTensor[B, P + T]``,
  ``True`` where a key slot holds a real token. The module combines it with its own
  causal mask: new token ``j`` sees past slots and new slots ``<= j``.
* returns ``logits``: ``Tensor[B, T, vocab]`` for every new token, and ``new_past``: one
  ``(keys, values)`` pair per layer, ``[B, heads, P + T, head_dim]`` (past then new).
"""


class Runner:
    """What :class:`~backends.torch.TorchModel` needs from a wrapped network."""

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        past: KV | None,
        attention_mask: torch.Tensor | None,
        logits_to_keep: int,
    ) -> tuple[torch.Tensor, KV]:
        """Run the network.

        Args:
            input_ids: ``[B, T]`` new tokens.
            positions: ``[B, T]`` their absolute positions.
            past: cached per-layer ``(keys, values)`` ``[B, H, P, D]``, or ``None``.
            attention_mask: ``[B, P + T]`` bool, or ``None`` for unpadded rows.
            logits_to_keep: only the last ``logits_to_keep`` positions need logits.

        Returns:
            ``(logits, new_past)``: logits ``[B, >= logits_to_keep, V]`` whose last
            ``logits_to_keep`` positions are the last new tokens, and the grown cache.
        """
        raise NotImplementedError


class HFRunner(Runner):
    """Adapter for a Hugging Face ``*ForCausalLM`` model (transformers 4.46 to 5.x)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from transformers import DynamicCache

        self._model = model
        self._cache_cls = DynamicCache
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed the keyword; 4.x only knows past_key_values.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # 4.45-4.47 called it num_logits_to_keep
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)

    def _make_cache(self, past: KV | None) -> Any:
        cache = self._cache_cls()
        for i, (k, v) in enumerate(past or ()):
            cache.update(k, v, i)
        return cache

    @staticmethod
    def _read_cache(cache: Any) -> KV:
        layers = getattr(cache, "layers", None)
        if layers is not None:  # transformers >= 4.56
            return tuple((layer.keys, layer.values) for layer in layers)
        if hasattr(cache, "key_cache"):  # older 4.x
            return tuple(zip(cache.key_cache, cache.value_cache, strict=False))
        return tuple((k, v) for k, v in cache.to_legacy_cache())

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        past: KV | None,
        attention_mask: torch.Tensor | None,
        logits_to_keep: int,
    ) -> tuple[torch.Tensor, KV]:
        cache = self._make_cache(past)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "position_ids": positions,
            "attention_mask": attention_mask.long() if attention_mask is not None else None,
            self._cache_kw: cache,
            "use_cache": True,
            "return_dict": True,
        }
        if self._keep_kw:
            kwargs[self._keep_kw] = logits_to_keep
        out = self._model(**kwargs)
        return out.logits, self._read_cache(cache)


class ModuleRunner(Runner):
    """Adapter for a plain module with the signature in :data:`PLAIN_FORWARD_DOC`."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._module = module

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        past: KV | None,
        attention_mask: torch.Tensor | None,
        logits_to_keep: int,
    ) -> tuple[torch.Tensor, KV]:
        logits, new_past = self._module(input_ids, positions, past, attention_mask)
        return logits, tuple((k, v) for k, v in new_past)


def is_hf_causal_lm(module: Any) -> bool:
    """True when ``module`` looks like a transformers ``PreTrainedModel`` with a config."""
    return hasattr(module, "config") and hasattr(module, "can_generate")


def stack_past(states: Sequence[KV | None], width: int) -> KV | None:
    """Left-pad per-handle states to ``width`` slots and stack them into one batch.

    Args:
        states: one state (``[1, H, c_b, D]`` per layer) or ``None`` per row.
        width: the padded past length ``P = max c_b``.

    Returns:
        The batched past ``[B, H, P, D]`` per layer, or ``None`` when ``width == 0``.
    """
    if width == 0:
        return None
    template = next(s for s in states if s is not None)
    out = []
    for layer, (k0, v0) in enumerate(template):
        ks, vs = [], []
        for s in states:
            if s is None:
                shape_k = (1, *k0.shape[1:-2], width, k0.shape[-1])
                shape_v = (1, *v0.shape[1:-2], width, v0.shape[-1])
                ks.append(k0.new_zeros(shape_k))
                vs.append(v0.new_zeros(shape_v))
                continue
            k, v = s[layer]
            pad = width - k.shape[-2]
            if pad:
                k = torch.nn.functional.pad(k, (0, 0, pad, 0))
                v = torch.nn.functional.pad(v, (0, 0, pad, 0))
            ks.append(k)
            vs.append(v)
        out.append((torch.cat(ks, dim=0), torch.cat(vs, dim=0)))
    return tuple(out)


def slice_state(state: KV, row: int, start: int, stop: int) -> KV:
    """Row ``row`` of a batched state, slots ``[start, stop)``, as a ``[1, H, n, D]`` view."""
    return tuple(
        (k[row : row + 1, ..., start:stop, :], v[row : row + 1, ..., start:stop, :])
        for k, v in state
    )
