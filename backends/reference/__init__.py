"""The exact numpy reference backend (no engine needed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ssd_core import LatencyModel, Model
from ssd_core.app import BackendSpec

from .._specs import Keys, flag, parse_spec_items
from ._model import ReferenceModel

__all__ = ["BACKEND", "ReferenceModel", "parse_spec"]

_KEYS: Keys = {
    "vocab": ("vocab_size", int),
    "vocab_size": ("vocab_size", int),
    "order": ("order", int),
    "seed": ("seed", int),
    "context": ("context_size", int),
    "tie_levels": ("tie_levels", int),
    "peakedness": ("peakedness", float),
    "zero_fraction": ("zero_fraction", float),
    "divergence": ("divergence", float),
    "latency_ms": ("latency_ms", float),
    "token_ms": ("token_ms", float),
    "sleep": ("sleep", flag),
}


def parse_spec(args: str) -> dict[str, Any]:
    """Parse ``vocab=64,order=2,seed=1`` into constructor arguments."""
    return parse_spec_items(args, owner="reference", keys=_KEYS)


def _load(args: str, options: Mapping[str, Any]) -> ReferenceModel:
    """``vocab=..,order=..,seed=..[,peakedness=..]``; a draft adds ``divergence=..``
    and is then a perturbed copy of the model the other keys describe. ``latency_ms``
    and ``token_ms`` attach a latency model (per call, per token); ``sleep=0`` makes it
    only modelled (for ``--driver simulated``), not slept. Keys a draft
    spec leaves out are taken from the target's spec (``options["target_args"]``)."""
    kw = parse_spec(str(options.get("target_args", ""))) if options.get("role") == "draft" else {}
    own = parse_spec(args)
    for key in ("latency_ms", "token_ms", "sleep"):  # a draft does not inherit the target's costs
        kw.pop(key, None)
    kw.update(own)
    divergence = kw.pop("divergence", None)
    context_size = kw.pop("context_size", None)
    latency_ms = kw.pop("latency_ms", 0.0)
    token_ms = kw.pop("token_ms", 0.0)
    sleep = kw.pop("sleep", True)
    extra: dict[str, Any] = {"context_size": context_size, "sleep": sleep}
    if latency_ms or token_ms:
        extra["latency"] = LatencyModel(
            per_call=latency_ms / 1e3, per_token=token_ms / 1e3, prefill_per_token=token_ms / 1e3
        )
    kw.setdefault("vocab_size", 64)
    if divergence is None:
        return ReferenceModel.random(**kw, **extra)
    seed = kw.get("seed", 0)
    target = ReferenceModel.random(**kw)
    return ReferenceModel.perturbed(target, divergence=divergence, seed=seed + 7919, **extra)


BACKEND = BackendSpec(
    name="reference",
    load=_load,
    default_target="reference:vocab=64,order=2,seed=1",
    default_draft="reference:divergence=0.5",
    description="exact numpy n-gram models built from a seed (tests, benchmarks)",
)


if TYPE_CHECKING:

    def _is_a_model(model: ReferenceModel) -> Model:
        """mypy proves here that ReferenceModel meets the Model protocol."""
        return model
