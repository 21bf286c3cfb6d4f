"""A model-free n-gram / prompt-lookup draft backend (pure numpy, no engine)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ssd_core import ConfigError, Model
from ssd_core.app import BackendSpec

from .._specs import parse_spec_items
from ._model import NgramModel

__all__ = ["BACKEND", "NgramModel", "parse_spec"]

_KEYS = {
    "max_n": ("max_n", int),
    "n": ("max_n", int),
    "vocab": ("vocab_size", int),
    "vocab_size": ("vocab_size", int),
    "context": ("context_size", int),
    "context_size": ("context_size", int),
    "alpha": ("alpha", float),
    "escape": ("escape", float),
}


def parse_spec(args: str) -> dict[str, Any]:
    """Parse ``max_n=3,alpha=0.01`` into :class:`NgramModel` arguments.

    Raises:
        ConfigError: an item is not ``key=value``, the key is unknown, or the value bad.
    """
    return parse_spec_items(args, owner="ngram", keys=_KEYS)


def _load(args: str, options: Mapping[str, Any]) -> Model:
    """``ngram:max_n=3,alpha=0.01``; ``options["vocab_size"]`` (the target's) is required
    unless the spec names ``vocab_size``; ``options["context_size"]`` is used if given."""
    kw = parse_spec(args)
    if "vocab_size" not in kw:
        if options.get("vocab_size") is None:
            raise ConfigError(
                "the ngram draft needs the target's vocab_size (options['vocab_size'])"
            )
        kw["vocab_size"] = int(options["vocab_size"])
    elif options.get("vocab_size") is not None and int(options["vocab_size"]) != kw["vocab_size"]:
        raise ConfigError(
            f"ngram spec vocab_size={kw['vocab_size']} differs from the target's "
            f"{options['vocab_size']}"
        )
    if "context_size" not in kw and options.get("context_size") is not None:
        kw["context_size"] = int(options["context_size"])
    return NgramModel(**kw)


BACKEND = BackendSpec(
    name="ngram",
    load=_load,
    default_target=None,
    default_draft="ngram:max_n=3,alpha=1e-8",
    description="model-free n-gram / prompt-lookup draft from each sequence's own history",
)


if TYPE_CHECKING:

    def _is_a_model(model: NgramModel) -> Model:
        """mypy proves here that NgramModel meets the Model protocol."""
        return model
