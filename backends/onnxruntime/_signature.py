"""Reading a decoder graph's I/O signature from an inference session.

The expected signature (the Hugging Face / Optimum convention)::

    inputs   input_ids                 int64 [batch, sequence]               required
             attention_mask            int64 [batch, past + sequence]        optional
             position_ids              int64 [batch, sequence]               optional
             past_key_values.N.key     float [batch, kv_heads, past, head_dim]  } KV graphs,
             past_key_values.N.value   float [batch, kv_heads, past, head_dim]  } N = 0..L-1
    outputs  logits                    float [batch, sequence, vocab]        required
             present.N.key / .value    float [batch, kv_heads, past + sequence, head_dim]

A graph with no ``past_key_values.*`` inputs is run without a cache: every extend
recomputes the whole context (slower, still exact).
"""

from __future__ import annotations

import re
from typing import Any

import attrs
import numpy as np

from ssd_core import ConfigError

__all__ = ["GraphSignature", "read_signature"]

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")
_FLOAT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(bfloat16)": None,  # no numpy type: held in torch buffers
}
_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


@attrs.frozen(kw_only=True)
class GraphSignature:
    """What a decoder graph takes and returns.

    Attributes:
        ids_dtype: dtype of ``input_ids``/``position_ids``/``attention_mask`` feeds.
        mask_dtype: dtype of the ``attention_mask`` feed (``None``: no such input).
        has_positions: the graph takes ``position_ids``.
        logits_name: name of the logits output.
        vocab_size: the static last dimension of the logits, or ``None`` if dynamic.
        past_names: past input names ``(key0, value0, key1, ...)``; empty: no cache.
        present_names: the matching present output names.
        kv_heads: KV heads (static dim 1 of the past inputs).
        head_dim: head size (static dim 3 of the past inputs).
        kv_dtype: numpy dtype of the past inputs (``None`` for bfloat16).
        kv_type: ONNX type name of the past inputs (``"float"``, ``"float16"``, ...).
        logits_type: ONNX type name of the logits.
    """

    ids_dtype: type
    mask_dtype: type | None
    has_positions: bool
    logits_name: str
    vocab_size: int | None
    past_names: tuple[str, ...] = ()
    present_names: tuple[str, ...] = ()
    kv_heads: int = 0
    head_dim: int = 0
    kv_dtype: type | None = np.float32
    kv_type: str = "float"
    logits_type: str = "float"

    @property
    def ids_type(self) -> str:
        return "int64" if self.ids_dtype is np.int64 else "int32"

    @property
    def mask_type(self) -> str:
        return "int64" if self.mask_dtype is np.int64 else "int32"

    @property
    def has_cache(self) -> bool:
        return bool(self.past_names)

    @property
    def has_mask(self) -> bool:
        return self.mask_dtype is not None

    @property
    def num_layers(self) -> int:
        return len(self.past_names) // 2

    def output_names(self) -> list[str]:
        return [self.logits_name, *self.present_names]


def _static(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _layers(names: dict[str, Any], pattern: re.Pattern[str], what: str) -> tuple[str, ...]:
    found: dict[int, dict[str, str]] = {}
    for name in names:
        m = pattern.match(name)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = name
    if not found:
        return ()
    if sorted(found) != list(range(len(found))):
        raise ConfigError(f"{what} layers are not numbered 0..N-1: {sorted(found)}")
    out: list[str] = []
    for i in range(len(found)):
        if set(found[i]) != {"key", "value"}:
            raise ConfigError(f"{what} layer {i} lacks a key or a value")
        out += [found[i]["key"], found[i]["value"]]
    return tuple(out)


def read_signature(session: Any) -> GraphSignature:
    """Read the I/O signature of ``session`` (an ``onnxruntime.InferenceSession``).

    Args:
        session: the session (only ``get_inputs``/``get_outputs`` are used).

    Returns:
        The :class:`GraphSignature`.

    Raises:
        ConfigError: the graph does not follow the documented signature (missing
            ``input_ids`` or logits, past without present, dynamic KV head sizes,
            unsupported dtypes, unknown extra inputs).
    """
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if "input_ids" not in inputs:
        raise ConfigError(f"graph has no 'input_ids' input (inputs: {sorted(inputs)})")
    ids_dtype = _INT_TYPES.get(inputs["input_ids"].type)
    if ids_dtype is None:
        raise ConfigError(f"input_ids must be int64 or int32, not {inputs['input_ids'].type}")
    mask_dtype = None
    if "attention_mask" in inputs:
        mask_dtype = _INT_TYPES.get(inputs["attention_mask"].type)
        if mask_dtype is None:
            raise ConfigError(
                f"attention_mask must be int64 or int32, not {inputs['attention_mask'].type}"
            )
    if "position_ids" in inputs and inputs["position_ids"].type not in _INT_TYPES:
        raise ConfigError(f"position_ids must be int64 or int32, not {inputs['position_ids'].type}")
    logits_name = "logits" if "logits" in outputs else next(iter(outputs), None)
    if logits_name is None:
        raise ConfigError("graph has no outputs")
    logits_shape = outputs[logits_name].shape
    logits_type = _type_name(outputs[logits_name].type)
    if logits_type not in ("float", "float16", "double", "bfloat16"):
        raise ConfigError(f"logits must be a float tensor, not {outputs[logits_name].type}")
    if len(logits_shape) != 3:
        raise ConfigError(f"logits output {logits_name!r} must be 3-D, got shape {logits_shape}")
    past = _layers(inputs, _PAST, "past_key_values")
    present = _layers(outputs, _PRESENT, "present")
    known = {"input_ids", "attention_mask", "position_ids", *past}
    extra = sorted(set(inputs) - known)
    if extra:
        raise ConfigError(f"graph has inputs OrtModel does not know how to feed: {extra}")
    common = dict(
        ids_dtype=ids_dtype,
        mask_dtype=mask_dtype,
        has_positions="position_ids" in inputs,
        logits_name=logits_name,
        vocab_size=_static(logits_shape[2]),
        logits_type=logits_type,
    )
    if not past:
        return GraphSignature(**common)  # type: ignore[arg-type]
    if len(present) != len(past):
        raise ConfigError(
            f"graph has {len(past) // 2} past layers but {len(present) // 2} present layers"
        )
    first = inputs[past[0]]
    if first.type not in _FLOAT_TYPES:
        raise ConfigError(
            f"past_key_values must be float/float16/bfloat16/double, not {first.type}"
        )
    kv_dtype = _FLOAT_TYPES[first.type]
    if len(first.shape) != 4:
        raise ConfigError(
            f"past_key_values must be 4-D [batch, heads, past, head_dim], got {first.shape}"
        )
    kv_heads, head_dim = _static(first.shape[1]), _static(first.shape[3])
    if kv_heads is None or head_dim is None:
        raise ConfigError(f"past_key_values need static head and head_dim sizes, got {first.shape}")
    return GraphSignature(
        **common,  # type: ignore[arg-type]
        past_names=past,
        present_names=present,
        kv_heads=kv_heads,
        head_dim=head_dim,
        kv_dtype=kv_dtype,
        kv_type=_type_name(first.type),
    )


def _type_name(onnx_type: str) -> str:
    """``"tensor(float16)"`` -> ``"float16"``."""
    return onnx_type.removeprefix("tensor(").removesuffix(")")
