"""Forward adapters: one forward pass over the KV pool.

A :class:`Forward` describes one pass: per row (one handle), the positions it writes
(``start ...``), their tokens, their slots in the pool, and how many of its last tokens
need logits. A *runner* turns it into device inputs, runs the network and returns the
logits rows asked for (in row order), having written every token's keys and values into
the pool. Three runners exist:

* :class:`HFRunner` wraps a Hugging Face causal LM. All the pass's tokens go in *one*
  packed row; the model gets a cache object (:class:`PoolCache`, a ``DynamicCache``
  subclass) whose ``update`` writes the new keys/values into the pool in place and
  returns views of the pool's arenas, and a 4-D additive mask built on the device from
  the block tables (:func:`~backends.torch._pool.tree_mask`). The tokens that need
  logits are packed last, so ``logits_to_keep`` makes the LM head run on them only.
* :class:`ModuleRunner` does the same for a plain module that declares
  ``kv_pool = True`` (see :data:`PLAIN_FORWARD_DOC`; :class:`~backends.torch.TinyTransformer`).
* :class:`LegacyModuleRunner` serves plain modules with the older dense signature
  (``past`` as per-layer tensors): it gathers each row's past from the pool into a
  padded batch (a copy, counted in ``stats.kv_gather_bytes``) and stores the new part.

Inputs are uploaded once per pass as one int64 buffer (pinned, ``non_blocking`` on
CUDA) and split on the device; nothing here reads a device value back.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import attrs
import numpy as np
import torch

from ._device import hf_embeddings, upload
from ._pool import KVPool, Stats, tree_mask

__all__ = [
    "PLAIN_FORWARD_DOC",
    "Forward",
    "HFRunner",
    "LegacyModuleRunner",
    "ModuleRunner",
    "Runner",
    "is_hf_causal_lm",
]

#: Per-layer ``(keys, values)``, each ``[batch, heads, length, head_dim]``.
KV = tuple[tuple[torch.Tensor, torch.Tensor], ...]

PLAIN_FORWARD_DOC = """\
A plain module declares which of two signatures it has.

With ``kv_pool = True`` (class or instance attribute; preferred):
``module(input_ids, positions, past, attention_mask) -> logits``

* ``input_ids``: ``LongTensor[1, T]``, the tokens of this pass, packed in one row.
* ``positions``: ``LongTensor[1, T]``, the absolute position of every token.
* ``past``: a cache object: layer ``i`` calls ``past.update(keys, values, i)`` with its
  new ``[1, kv_heads, T, head_dim]`` keys and values and attends over the returned
  ``(keys, values)``, each ``[1, kv_heads, S, head_dim]`` (views of the pool: never
  modify them).
* ``attention_mask``: ``BoolTensor[1, T, S]``, ``True`` where query ``j`` may see key
  slot ``s``. It is complete (causality included): use it as is.
* returns ``logits``: ``Tensor[1, T, vocab]`` (or a tuple whose first item is that).
* optional keyword ``logits_to_keep`` (``int``): when the forward accepts it, only the
  last ``logits_to_keep`` tokens need logits (``[1, logits_to_keep, vocab]`` is enough);
  the backend packs the tokens that need logits last.

Without it (the older dense signature, served by copying each row's past out of the
pool): ``module(input_ids, positions, past, attention_mask) -> (logits, new_past)``

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


@attrs.define
class Forward:
    """One forward pass (host-side description; see the module docstring).

    Attributes:
        pool: the model's KV pool.
        tokens: per row, the tokens written this pass.
        starts: per row, the position of its first token.
        keep: per row, how many of its last tokens need logits.
        tables: per row, its block table after the pass.
        slots: per row, the pool slot of each token.
        device: where inputs are built (the embedding's device).
        stats: byte counters.
    """

    pool: KVPool
    tokens: list[list[int]]
    starts: list[int]
    keep: list[int]
    tables: list[list[int]]
    slots: list[list[int]]
    device: torch.device
    stats: Stats
    span_blocks: int = 0
    _slots_on: dict[torch.device, torch.Tensor] = attrs.field(factory=dict)

    @property
    def n_logits(self) -> int:
        return sum(self.keep)

    @property
    def span(self) -> int:
        """Slots ``[0, span)`` of the arenas are attended."""
        return self.span_blocks * self.pool.block_size

    def _upload(self, parts: list[np.ndarray]) -> list[torch.Tensor]:
        host = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        self.stats.upload_bytes += host.nbytes
        dev = upload(host, self.device)
        out, at = [], 0
        for p in parts:
            out.append(dev[at : at + p.size])
            at += p.size
        return out

    def slots_on(self, device: torch.device) -> torch.Tensor:
        """The pass's write slots (in the runner's token order) on ``device``."""
        if device not in self._slots_on:
            first = next(iter(self._slots_on.values()))
            self._slots_on[device] = first.to(device, non_blocking=True)
        return self._slots_on[device]

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Device inputs for the packed layout: ``(ids [1, T], positions [1, T],
        mask [T, S] bool)``; the tokens needing logits come last, in row order."""
        order: list[tuple[int, int, int]] = []  # (row, first index, count)
        for r, (toks, keep) in enumerate(zip(self.tokens, self.keep, strict=True)):
            order.append((r, 0, len(toks) - keep))
        for r, (toks, keep) in enumerate(zip(self.tokens, self.keep, strict=True)):
            order.append((r, len(toks) - keep, keep))
        ids, pos, rows, slots = [], [], [], []
        for r, i, n in order:
            if n:
                ids.append(np.asarray(self.tokens[r][i : i + n], dtype=np.int64))
                pos.append(np.arange(self.starts[r] + i, self.starts[r] + i + n, dtype=np.int64))
                rows.append(np.full(n, r, dtype=np.int64))
                slots.append(np.asarray(self.slots[r][i : i + n], dtype=np.int64))
        width = max(len(t) for t in self.tables)
        tables = np.full((len(self.tables), width), -1, dtype=np.int64)
        for r, t in enumerate(self.tables):
            tables[r, : len(t)] = t
        self.span_blocks = 1 + int(tables.max())
        d_ids, d_pos, d_rows, d_slots, d_tables = self._upload(
            [
                np.concatenate(ids),
                np.concatenate(pos),
                np.concatenate(rows),
                np.concatenate(slots),
                tables.reshape(-1),
            ]
        )
        self._slots_on = {self.device: d_slots}
        mask = tree_mask(
            d_tables.view(len(self.tables), width),
            d_rows,
            d_pos,
            span_blocks=self.span_blocks,
            block_size=self.pool.block_size,
        )
        return d_ids[None], d_pos[None], mask

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new ``[1, H, T, D]`` keys/values; the attended views back."""
        self.pool.write(layer, keys[0], values[0], self.slots_on(keys.device))
        return self.pool.view(layer, self.span)


class Runner:
    """What :class:`~backends.torch.TorchModel` needs from a wrapped network."""

    def forward(self, fw: Forward) -> torch.Tensor:
        """Run one pass: write every token's KV into the pool, return the
        ``fw.n_logits`` logits rows asked for (row order) as ``[n_logits, vocab]``."""
        raise NotImplementedError


def _kwarg(params: Any, *names: str) -> str | None:
    return next((k for k in names if k in params), None)


class PoolCache:
    """The cache object a pooled plain module gets: ``update`` writes into the pool."""

    def __init__(self, fw: Forward) -> None:
        self._fw = fw

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``[1, H, T, D]`` keys/values of ``layer``; return the attended views."""
        return self._fw.write(layer, keys, values)

    def get_seq_length(self, layer: int = 0) -> int:
        return self._fw.span


#: The attention implementation the backend gives sdpa Llama-family models: transformers'
#: sdpa, except that for the pool's packed row with grouped-query attention the query
#: heads sharing a KV head are stacked along the query axis, so the pool's keys and
#: values are read once per KV head instead of being expanded (``repeat_kv``: a copy of
#: the whole span per layer per call, x the group size). Same results; anything else
#: (no mask, a batch, softcapping, ...) goes to transformers' sdpa unchanged.
POOL_SDPA = "ssd_pool_sdpa"


def _register_pool_sdpa() -> bool:
    """Register :data:`POOL_SDPA` with transformers (once); False if it cannot be."""
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import AttentionInterface
    except ImportError:  # an older transformers: plain sdpa
        return False

    def pool_sdpa(
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        groups = int(getattr(module, "num_key_value_groups", 1))
        packed = (
            groups > 1
            and attention_mask is not None
            and attention_mask.dtype == torch.bool
            and attention_mask.dim() == 4
            and attention_mask.shape[:2] == (1, 1)
            and query.shape[0] == 1
            and dropout == 0.0
            and kwargs.get("softcap") is None
            and kwargs.get("position_bias") is None
            and not kwargs.get("output_attentions")
        )
        if not packed or attention_mask is None:  # (packed implies a mask)
            return sdpa_attention_forward(
                module,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                **kwargs,
            )
        _, heads, t, d = query.shape
        q = query.reshape(1, key.shape[1], groups * t, d)
        # the mask repeated per stacked query head, made once per pass (every layer gets
        # the same mask tensor), kept on the tensor itself
        cached = getattr(attention_mask, "_ssd_grouped", None)
        if cached is None or cached[0] != groups:
            cached = (groups, attention_mask.repeat(1, 1, groups, 1))
            with contextlib.suppress(AttributeError, TypeError):
                attention_mask._ssd_grouped = cached  # type: ignore[attr-defined]
        mask = cached[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, key, value, attn_mask=mask, scale=scaling
        )
        return out.reshape(1, heads, t, d).transpose(1, 2).contiguous(), None

    AttentionInterface.register(POOL_SDPA, pool_sdpa)
    AttentionMaskInterface.register(POOL_SDPA, sdpa_mask)
    return True


def _hf_cache_class() -> type:
    from transformers import DynamicCache

    class HFPoolCache(DynamicCache):
        """A ``DynamicCache`` whose ``update`` writes into the KV pool in place."""

        def __init__(self, fw: Forward) -> None:
            super().__init__()
            self._fw = fw

        def update(
            self,
            key_states: torch.Tensor,
            value_states: torch.Tensor,
            layer_idx: int,
            *args: Any,
            **kwargs: Any,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return self._fw.write(layer_idx, key_states, value_states)

        def get_seq_length(self, layer_idx: int | None = 0) -> int:
            return self._fw.span

    return HFPoolCache


class HFRunner(Runner):
    """Adapter for a Hugging Face ``*ForCausalLM`` model (transformers 4.46 to 5.x)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self._cache_cls = _hf_cache_class()
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed the keyword; 4.x only knows past_key_values.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # 4.45-4.47 called it num_logits_to_keep
        self._keep_kw = _kwarg(params, "logits_to_keep", "num_logits_to_keep")
        emb = hf_embeddings(model, "input")
        weight = getattr(emb, "weight", None)
        self._dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
        # sdpa takes a boolean mask as is; eager (and others) add the mask to the scores
        config = getattr(model, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        if impl == "sdpa" and _register_pool_sdpa():
            config._attn_implementation = POOL_SDPA  # type: ignore[union-attr]
            impl = POOL_SDPA
        self._bool_mask = impl in ("sdpa", POOL_SDPA)

    def forward(self, fw: Forward) -> torch.Tensor:
        ids, pos, allowed = fw.packed()
        # transformers passes a prepared 4-D mask through unchanged; eager attention adds
        # it to the scores, so it must then be additive, in the model's dtype
        if self._bool_mask:
            mask = allowed
        else:
            mask = torch.zeros(allowed.shape, dtype=self._dtype, device=allowed.device)
            mask.masked_fill_(~allowed, torch.finfo(self._dtype).min)
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "position_ids": pos,
            "attention_mask": mask[None, None],
            self._cache_kw: self._cache_cls(fw),
            "use_cache": True,
            "return_dict": True,
        }
        if self._keep_kw:
            kwargs[self._keep_kw] = fw.n_logits
        logits: torch.Tensor = self._model(**kwargs).logits
        return logits[0, logits.shape[1] - fw.n_logits :]


class ModuleRunner(Runner):
    """Adapter for a plain module with ``kv_pool = True`` (:data:`PLAIN_FORWARD_DOC`)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._module = module
        params = inspect.signature(module.forward).parameters
        self._keep_kw = "logits_to_keep" in params

    def forward(self, fw: Forward) -> torch.Tensor:
        ids, pos, allowed = fw.packed()
        extra = {"logits_to_keep": fw.n_logits} if self._keep_kw else {}
        out = self._module(ids, pos, PoolCache(fw), allowed[None], **extra)
        logits: torch.Tensor = out[0] if isinstance(out, (tuple, list)) else out
        return logits[0, logits.shape[1] - fw.n_logits :]


class LegacyModuleRunner(Runner):
    """Adapter for a plain module with the dense signature: past gathered from the pool."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._module = module

    def forward(self, fw: Forward) -> torch.Tensor:
        pool, bs = fw.pool, fw.pool.block_size
        n_rows = len(fw.tokens)
        p = max(fw.starts)
        t = max(len(x) for x in fw.tokens)
        padded = any(s != p for s in fw.starts) or any(len(x) != t for x in fw.tokens)
        ids = np.zeros((n_rows, t), dtype=np.int64)
        pos = np.zeros((n_rows, t), dtype=np.int64)
        mask = np.zeros((n_rows, p + t), dtype=np.int64)
        past_slots = np.zeros((n_rows, p), dtype=np.int64)
        new_flat, logit_flat, slots = [], [], []
        for r, (toks, start) in enumerate(zip(fw.tokens, fw.starts, strict=True)):
            m = len(toks)
            ids[r, :m] = toks
            pos[r, :m] = np.arange(start, start + m)
            pos[r, m:] = start + m - 1
            mask[r, p - start : p + m] = 1
            table = np.asarray(fw.tables[r], dtype=np.int64)
            held = np.arange(start)
            past_slots[r, p - start :] = table[held // bs] * bs + held % bs if start else []
            new_flat += [r * t + j for j in range(m)]
            logit_flat += [r * t + j for j in range(m - fw.keep[r], m)]
            slots += fw.slots[r]
        d_ids, d_pos, d_mask, d_past, d_new, d_logit, d_slots = fw._upload(
            [
                ids.reshape(-1),
                pos.reshape(-1),
                mask.reshape(-1),
                past_slots.reshape(-1),
                np.asarray(new_flat, dtype=np.int64),
                np.asarray(logit_flat, dtype=np.int64),
                np.asarray(slots, dtype=np.int64),
            ]
        )
        fw._slots_on = {fw.device: d_slots}
        past = None
        if p:
            past = []
            for layer in sorted(pool.keys):
                pair = []
                for arena in (pool.keys[layer], pool.values[layer]):
                    g = arena.index_select(1, d_past)  # [H, R * P, D]
                    fw.stats.kv_gather_bytes += g.numel() * g.element_size()
                    pair.append(g.view(g.shape[0], n_rows, p, g.shape[2]).transpose(0, 1))
                past.append((pair[0], pair[1]))
        attn = d_mask.view(n_rows, p + t).bool() if padded else None
        logits: torch.Tensor
        logits, new_past = self._module(d_ids.view(n_rows, t), d_pos.view(n_rows, t), past, attn)
        for layer, (k, v) in enumerate(new_past):
            kn = k[:, :, p:].transpose(0, 1).reshape(k.shape[1], n_rows * t, k.shape[3])
            vn = v[:, :, p:].transpose(0, 1).reshape(v.shape[1], n_rows * t, v.shape[3])
            pool.write(layer, kn.index_select(1, d_new), vn.index_select(1, d_new), d_slots)
        if logits.dim() != 3 or logits.shape[:2] != (n_rows, t):
            return logits  # a wrong shape: the caller reports it
        return logits.reshape(n_rows * t, logits.shape[-1]).index_select(0, d_logit)


def is_hf_causal_lm(module: Any) -> bool:
    """True when ``module`` looks like a transformers ``PreTrainedModel`` with a config."""
    return hasattr(module, "config") and hasattr(module, "can_generate")


def pooled_plain(module: Any) -> bool:
    """True when a plain module declares the pooled signature (``kv_pool = True``)."""
    return bool(getattr(module, "kv_pool", False))
