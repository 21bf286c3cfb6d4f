"""The exact numpy reference backend (no engine needed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ssd_core import BackendSpec, ConfigError
from ._model import ReferenceModel

__all__ = ["BACKEND", "ReferenceModel", "parse_spec"]

_INT_KEYS = {"vocab": "vocab_size", "vocab_size": "vocab_size", "order": "order", "seed": "seed",
             "context": "context_size", "tie_levels": "tie_levels"}
_FLOAT_KEYS = {"peakedness": "peakedness", "zero_fraction": "zero_fraction",
               "divergence": "divergence"}


def parse_spec(args: str) -> dict[str, Any]:
    """Parse ``vocab=64,order=2,seed=1`` into constructor arguments."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in args.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"reference spec item {part!r} is not key=value")
        try:
            if key in _INT_KEYS:
                out[_INT_KEYS[key]] = int(value)
            elif key in _FLOAT_KEYS:
                out[_FLOAT_KEYS[key]] = float(value)
            else:
                known = ", ".join(sorted({*_INT_KEYS, *_FLOAT_KEYS}))
                raise ConfigError(f"unknown reference spec key {key!r}; known: {known}")
        except ValueError as exc:
            raise ConfigError(f"reference spec {key}={value!r}: {exc}") from None
    return out


def _load(args: str, options: Mapping[str, Any]) -> ReferenceModel:
    """``vocab=..,order=..,seed=..[,peakedness=..]``; a draft adds ``divergence=..``
    and is then a perturbed copy of the model the other keys describe. Keys a draft
    spec leaves out are taken from the target's spec (``options["target_args"]``)."""
    kw = parse_spec(str(options.get("target_args", ""))) if options.get("role") == "draft" else {}
    kw.update(parse_spec(args))
    divergence = kw.pop("divergence", None)
    context_size = kw.pop("context_size", None)
    kw.setdefault("vocab_size", 64)
    if divergence is None:
        return ReferenceModel.random(**kw, context_size=context_size)
    seed = kw.get("seed", 0)
    target = ReferenceModel.random(**kw)
    return ReferenceModel.perturbed(
        target, divergence=divergence, seed=seed + 7919, context_size=context_size
    )


BACKEND = BackendSpec(
    name="reference",
    load=_load,
    default_target="reference:vocab=64,order=2,seed=1",
    default_draft="reference:divergence=0.5",
    description="exact numpy n-gram models built from a seed (tests, benchmarks)",
)
