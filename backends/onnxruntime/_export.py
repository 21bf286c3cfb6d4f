"""Tiny random-weight Llama-style models, exported to ONNX with explicit KV-cache I/O.

These are test fixtures and a worked example of the graph signature
:class:`~backends.onnxruntime.OrtModel` expects (see ``docs/onnxruntime.md``). The
architecture follows Llama: RMSNorm, rotary position embeddings computed from
``position_ids``, grouped-query attention, a SwiGLU MLP and an untied output head; with
options for what Llama-3.x and Qwen2 add -- rope scaling (``linear``, ``llama3``; any
static rotary table when copied from transformers), biases on the q/k/v (Qwen2), output
and MLP projections, a head size other than ``hidden / heads`` -- and float16 or
bfloat16 weights and activations (RMSNorm, softmax and the rotary table in float32, as
transformers does).

Masking is by *slot*: query ``j`` of a call sits in slot ``past_len + j`` and sees key
slot ``s`` iff ``s <= past_len + j`` and ``attention_mask[s] == 1``. Positions come only
from ``position_ids``, so a left-padded past and right-padded new tokens give the same
logits for the real tokens as an unpadded call.

torch and onnx are imported when a function here is called, never at package import.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import TYPE_CHECKING, Any

from ssd_core import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "MAX_IR_VERSION",
    "from_hf_llama",
    "OPSET",
    "build_tiny_llama",
    "export_module",
    "export_test_pair",
    "export_tiny_llama",
]

_log = logging.getLogger(__name__)

#: The highest ONNX IR version onnxruntime 1.31 reads (onnx >= 1.23 writes 14 by default).
MAX_IR_VERSION = 13
#: The opset the exporter writes.
OPSET = 17


def build_tiny_llama(
    *,
    vocab_size: int = 96,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    context_size: int = 128,
    rope_theta: float = 10000.0,
    rms_eps: float = 1e-6,
    scale: float = 0.3,
    seed: int = 0,
    kv_cache: bool = True,
    head_dim: int | None = None,
    dtype: str = "float32",
    qkv_bias: bool = False,
    o_bias: bool = False,
    mlp_bias: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    inv_freq: torch.Tensor | None = None,
    attention_scaling: float = 1.0,
    random_init: bool = True,
) -> torch.nn.Module:
    """Build a random-weight tiny Llama as a plain ``torch.nn.Module``.

    Its ``forward(input_ids, attention_mask, position_ids, *past)`` returns
    ``(logits, *present)`` with ``past``/``present`` ordered ``layer0.key, layer0.value,
    layer1.key, ...``, each ``[batch, num_kv_heads, length, head_dim]``. With
    ``kv_cache=False`` it takes no past and returns only the logits.

    Args:
        vocab_size: number of tokens.
        hidden_size: model width, divisible by ``num_heads``.
        intermediate_size: MLP width.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads; divides ``num_heads``.
        context_size: recorded as the model's context size (rotary positions are not
            bounded, but the exported graph advertises this limit).
        rope_theta: rotary base.
        rms_eps: RMSNorm epsilon.
        scale: standard deviation of the random weights; larger is peakier.
        seed: weights are drawn from a generator seeded with this.
        kv_cache: whether the module takes and returns the KV cache.
        head_dim: per-head size (default ``hidden_size // num_heads``).
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``: weights, activations,
            KV cache and logits (norms, softmax and rotary angles stay float32).
        qkv_bias: biases on the query/key/value projections (Qwen2 has them).
        o_bias: a bias on the output projection (Llama's ``attention_bias`` adds it too).
        mlp_bias: biases on the MLP projections (Llama's ``mlp_bias``).
        rope_scaling: ``None``, ``{"rope_type": "linear", "factor": f}`` or the
            Llama-3 form ``{"rope_type": "llama3", "factor", "low_freq_factor",
            "high_freq_factor", "original_max_position_embeddings"}``.
        inv_freq: an explicit rotary frequency table (overrides the two above; what
            :func:`from_hf_llama` copies from transformers).
        attention_scaling: multiplies cos/sin (transformers' ``attention_scaling``).
        random_init: draw the random weights; ``False`` leaves them uninitialised (built
            on the meta device, then allocated), for a caller that overwrites every
            parameter -- :func:`from_hf_llama` (16 s of random draws for SmolLM2's
            135M parameters on a loaded 2-core machine, ~0 without).

    Returns:
        The module, in eval mode.

    Raises:
        ConfigError: inconsistent sizes, an unknown dtype or rope scaling.
    """
    import torch
    from torch import nn

    if vocab_size < 1 or num_layers < 1 or context_size < 1:
        raise ConfigError("vocab_size, num_layers and context_size must be >= 1")
    if num_heads % num_kv_heads or (head_dim is None and hidden_size % num_heads):
        raise ConfigError(
            f"hidden_size {hidden_size} must divide by num_heads {num_heads}, "
            f"which must divide by num_kv_heads {num_kv_heads}"
        )
    # New names rather than narrowing the parameters in place: mypy does not carry a
    # parameter's narrowing into the methods of the classes defined below.
    head_size = head_dim or hidden_size // num_heads
    if head_size % 2:
        raise ConfigError(f"head_dim {head_size} must be even for rotary embeddings")
    torch_dtype = _torch_dtype(dtype)
    rotary_freq = (
        inv_freq if inv_freq is not None else rope_frequencies(head_size, rope_theta, rope_scaling)
    )

    class RMSNorm(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.float()
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + rms_eps)
            return self.weight * y.to(x.dtype)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_norm = RMSNorm(hidden_size)
            self.q = nn.Linear(hidden_size, num_heads * head_size, bias=qkv_bias)
            self.k = nn.Linear(hidden_size, num_kv_heads * head_size, bias=qkv_bias)
            self.v = nn.Linear(hidden_size, num_kv_heads * head_size, bias=qkv_bias)
            self.o = nn.Linear(num_heads * head_size, hidden_size, bias=o_bias)
            self.post_norm = RMSNorm(hidden_size)
            self.gate = nn.Linear(hidden_size, intermediate_size, bias=mlp_bias)
            self.up = nn.Linear(hidden_size, intermediate_size, bias=mlp_bias)
            self.down = nn.Linear(intermediate_size, hidden_size, bias=mlp_bias)

        def forward(
            self,
            x: torch.Tensor,
            cos: torch.Tensor,
            sin: torch.Tensor,
            bias: torch.Tensor,
            past_k: torch.Tensor | None,
            past_v: torch.Tensor | None,
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            b, t, _ = x.shape
            h = self.input_norm(x)
            q = self.q(h).view(b, t, num_heads, head_size).transpose(1, 2)
            k = self.k(h).view(b, t, num_kv_heads, head_size).transpose(1, 2)
            v = self.v(h).view(b, t, num_kv_heads, head_size).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            if past_k is not None and past_v is not None:
                k = torch.cat([past_k, k], dim=2)
                v = torch.cat([past_v, v], dim=2)
            rep = num_heads // num_kv_heads
            kk = k.repeat_interleave(rep, dim=1)
            vv = v.repeat_interleave(rep, dim=1)
            scores = (q @ kk.transpose(-1, -2)) / (head_size**0.5) + bias
            att = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ vv
            x = x + self.o(att.transpose(1, 2).reshape(b, t, num_heads * head_size))
            h = self.post_norm(x)
            x = x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))
            return x, k, v

    class TinyLlama(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vocab_size = vocab_size
            self.context_size = context_size
            self.num_layers = num_layers
            self.num_kv_heads = num_kv_heads
            self.head_dim = head_size
            self.kv_cache = kv_cache
            self.embed = nn.Embedding(vocab_size, hidden_size)
            self.layers = nn.ModuleList(Layer() for _ in range(num_layers))
            self.norm = RMSNorm(hidden_size)
            self.head = nn.Linear(hidden_size, vocab_size, bias=False)
            self.dtype_name = dtype
            self.register_buffer("inv_freq", rotary_freq.float().clone(), persistent=False)

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor,
            *past: torch.Tensor,
        ) -> tuple[torch.Tensor, ...]:
            t = input_ids.shape[1]
            total = attention_mask.shape[1]
            p = total - t
            x = self.embed(input_ids)
            inv_freq: torch.Tensor = self.inv_freq  # type: ignore[assignment]
            freqs = position_ids.to(torch.float32)[:, :, None] * inv_freq[None, None, :]
            emb = torch.cat([freqs, freqs], dim=-1)
            cos = (emb.cos() * attention_scaling)[:, None].to(x.dtype)
            sin = (emb.sin() * attention_scaling)[:, None].to(x.dtype)
            # slot-causal mask combined with the padding mask, as an additive bias
            q_slot = torch.arange(t, device=x.device)[:, None] + p
            k_slot = torch.arange(total, device=x.device)[None, :]
            allowed = (k_slot <= q_slot)[None] & (attention_mask[:, None, :] > 0)
            neg = torch.finfo(x.dtype).min
            bias = torch.where(
                allowed, torch.zeros((), dtype=x.dtype), torch.full((), neg, dtype=x.dtype)
            )
            bias = bias[:, None]
            present: list[torch.Tensor] = []
            for i, layer in enumerate(self.layers):
                pk = past[2 * i] if self.kv_cache else None
                pv = past[2 * i + 1] if self.kv_cache else None
                x, k, v = layer(x, cos, sin, bias, pk, pv)
                present += [k, v]
            logits = self.head(self.norm(x))
            return (logits, *present) if self.kv_cache else (logits,)

    if random_init:
        gen = torch.Generator().manual_seed(seed)
        model = TinyLlama()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
                else:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)
    else:
        with torch.device("meta"):
            model = TinyLlama()
        model.to_empty(device="cpu")
    model.to(torch_dtype)
    model.inv_freq = rotary_freq.float().clone()  # the rotary table stays float32
    return model.eval()


_DTYPES = ("float32", "float16", "bfloat16")


def _torch_dtype(name: str) -> Any:
    import torch

    if name not in _DTYPES:
        raise ConfigError(f"dtype must be one of {_DTYPES}, got {name!r}")
    return getattr(torch, name)


def rope_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None = None
) -> torch.Tensor:
    """The rotary inverse-frequency table, with Llama-style scaling.

    Args:
        head_dim: per-head size (even).
        theta: the rotary base.
        scaling: ``None`` / ``{"rope_type": "default"}``, ``"linear"`` (``factor``) or
            ``"llama3"`` (``factor``, ``low_freq_factor``, ``high_freq_factor``,
            ``original_max_position_embeddings``), as in transformers' configs.

    Raises:
        ConfigError: another rope type (dynamic ones depend on the sequence length, so a
            fixed graph cannot hold them), or missing parameters.
    """
    import math

    import torch

    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in ("default", None):
        return inv
    try:
        factor = float(scaling["factor"])  # type: ignore[index]
        if kind == "linear":
            return inv / factor
        if kind == "llama3":
            low = float(scaling["low_freq_factor"])  # type: ignore[index]
            high = float(scaling["high_freq_factor"])  # type: ignore[index]
            old = float(scaling["original_max_position_embeddings"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"rope scaling {scaling} lacks a parameter: {exc}") from None
    if kind != "llama3":
        raise ConfigError(
            f"rope scaling {kind!r} is not supported (default, linear and llama3 are)"
        )
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def export_module(
    module: torch.nn.Module, path: str | os.PathLike[str], *, name: str = "tiny-llama"
) -> str:
    """Export a module built by :func:`build_tiny_llama` to ``path``.

    The graph gets the I/O names OrtModel expects, dynamic batch/sequence/past axes,
    opset :data:`OPSET`, IR version at most :data:`MAX_IR_VERSION`, and metadata
    ``context_size`` and ``name``.

    Args:
        module: the module (its ``kv_cache``, ``num_layers``, ``num_kv_heads``,
            ``head_dim``, ``context_size`` attributes describe it).
        path: where to write the ``.onnx`` file.
        name: stored as the model's name in the graph metadata.

    Returns:
        The path written, as a string.
    """
    import onnx
    import torch

    path = os.fspath(path)
    n_layers, kv_heads, head_dim = (
        int(module.num_layers),  # type: ignore[arg-type]
        int(module.num_kv_heads),  # type: ignore[arg-type]
        int(module.head_dim),  # type: ignore[arg-type]
    )
    kv = bool(module.kv_cache)
    ids = torch.zeros((1, 3), dtype=torch.int64)
    pos = torch.arange(3, dtype=torch.int64)[None] + (2 if kv else 0)
    mask = torch.ones((1, 5 if kv else 3), dtype=torch.int64)
    dtype = next(module.parameters()).dtype
    past = (
        [torch.zeros((1, kv_heads, 2, head_dim), dtype=dtype) for _ in range(2 * n_layers)]
        if kv
        else []
    )
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    for i in range(n_layers if kv else 0):
        for part in ("key", "value"):
            inputs.append(f"past_key_values.{i}.{part}")
            outputs.append(f"present.{i}.{part}")
            axes[inputs[-1]] = {0: "batch", 2: "past_sequence"}
            axes[outputs[-1]] = {0: "batch", 2: "total_sequence"}
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter's deprecation notice, and tracer notes on shape math
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=getattr(torch.jit, "TracerWarning", UserWarning))
        torch.onnx.export(
            module,
            (ids, mask, pos, *past),
            path,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    proto = onnx.load(path)
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    meta = {
        "context_size": str(module.context_size),
        "name": name,
        "dtype": str(getattr(module, "dtype_name", "float32")),
    }
    for prop in list(proto.metadata_props):
        if prop.key in meta:
            proto.metadata_props.remove(prop)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, path)
    _log.info("exported %s (%d layers, kv_cache=%s) to %s", name, n_layers, kv, path)
    return path


def export_tiny_llama(
    path: str | os.PathLike[str], *, name: str = "tiny-llama", **kwargs: Any
) -> str:
    """Build a random tiny Llama (:func:`build_tiny_llama`) and export it to ONNX.

    Args:
        path: where to write the ``.onnx`` file.
        name: stored in the graph metadata; becomes ``OrtModel.name``.
        **kwargs: passed to :func:`build_tiny_llama` (``vocab_size``, ``num_layers``,
            ``seed``, ``kv_cache``, ...).

    Returns:
        The path written, as a string.

    Raises:
        ConfigError: inconsistent sizes.
    """
    return export_module(build_tiny_llama(**kwargs), path, name=name)


def export_test_pair(
    directory: str | os.PathLike[str], *, vocab_size: int = 96, context_size: int = 128
) -> tuple[str, str]:
    """Export the small target/draft pair the tests and the conformance suite use.

    The target has 2 layers (width 32), the draft 1 layer (width 16), same vocabulary.

    Args:
        directory: an existing folder to write ``target.onnx`` and ``draft.onnx`` into.
        vocab_size: shared vocabulary size.
        context_size: recorded context size of both graphs.

    Returns:
        ``(target_path, draft_path)``.
    """
    common = dict(vocab_size=vocab_size, context_size=context_size, scale=0.3)
    target = export_tiny_llama(
        os.path.join(directory, "target.onnx"),
        name="target",
        num_layers=2,
        hidden_size=32,
        num_heads=4,
        num_kv_heads=2,
        seed=1,
        **common,
    )
    draft = export_tiny_llama(
        os.path.join(directory, "draft.onnx"),
        name="draft",
        num_layers=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        num_kv_heads=1,
        seed=2,
        **common,
    )
    return target, draft


def from_hf_llama(
    hf_model: Any, *, kv_cache: bool = True, dtype: str = "float32"
) -> torch.nn.Module:
    """Copy a Hugging Face Llama-family causal LM into the exportable module.

    The result computes the same logits with the explicit KV-cache signature, so
    :func:`export_module` can write it to ONNX without an exporter for transformers'
    cache classes; e.g. SmolLM2 loaded through transformers (``gguf_file=``) becomes an
    ONNX graph. Covered: Llama 1-3.x (rope scaling ``linear``/``llama3``/``yarn`` -- any
    rotary table that does not depend on the sequence length, copied from the model's
    own rotary module), ``attention_bias``/``mlp_bias``, Qwen2 (q/k/v biases), a
    ``head_dim`` other than ``hidden / heads``, tied or untied embeddings.

    Args:
        hf_model: a ``transformers.LlamaForCausalLM``, ``Qwen2ForCausalLM`` or a model
            with the same layout (``model.layers[i].self_attn.{q,k,v,o}_proj``,
            ``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``).
        kv_cache: export with or without the KV cache.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` for the exported module.

    Returns:
        The module, in eval mode.

    Raises:
        ConfigError: a configuration this copy does not support (a rope table that
            changes with the sequence length, sliding-window or non-full attention).
    """
    import torch

    cfg = hf_model.config
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("dynamic", "longrope"):
        raise ConfigError(f"rope scaling {kind!r} depends on the sequence length; not exportable")
    kinds = set(getattr(cfg, "layer_types", None) or ())
    if kinds - {"full_attention"} or getattr(cfg, "use_sliding_window", False):
        raise ConfigError(f"only full attention is exportable, got layer types {sorted(kinds)}")
    src = hf_model.model
    rotary = src.rotary_emb
    attn0, mlp0 = src.layers[0].self_attn, src.layers[0].mlp
    module = build_tiny_llama(
        vocab_size=int(cfg.vocab_size),
        hidden_size=int(cfg.hidden_size),
        intermediate_size=int(cfg.intermediate_size),
        num_layers=int(cfg.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        context_size=int(cfg.max_position_embeddings),
        rms_eps=float(cfg.rms_norm_eps),
        kv_cache=kv_cache,
        dtype=dtype,
        qkv_bias=attn0.q_proj.bias is not None,
        o_bias=attn0.o_proj.bias is not None,
        mlp_bias=mlp0.gate_proj.bias is not None,
        inv_freq=rotary.inv_freq.detach().float().cpu(),
        attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
        random_init=False,  # every parameter is copied below
    )
    names = {
        "input_norm": "input_layernorm",
        "post_norm": "post_attention_layernorm",
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }
    dst: Any = module  # attribute access on the nested TinyLlama class
    written: set[int] = set()

    def put(param: torch.Tensor, value: torch.Tensor) -> None:
        param.copy_(value)
        written.add(id(param))

    with torch.no_grad():
        put(dst.embed.weight, src.embed_tokens.weight)
        put(dst.norm.weight, src.norm.weight)
        put(dst.head.weight, hf_model.lm_head.weight)
        for mine, theirs in zip(dst.layers, src.layers, strict=True):
            for a, b in names.items():
                for part in ("weight", "bias"):
                    value = getattr(theirs.get_submodule(b), part, None)
                    if value is not None:
                        put(getattr(getattr(mine, a), part), value)
    unset = [n for n, p in module.named_parameters() if id(p) not in written]
    if unset:  # the module was built uninitialised: every parameter must come from hf
        raise ConfigError(
            f"the model's layout differs from Llama's: no weights for {unset[:5]}; "
            "this model cannot be exported"
        )
    return module.eval()
