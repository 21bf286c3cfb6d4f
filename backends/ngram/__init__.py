"""A model-free n-gram / prompt-lookup draft backend (pure numpy, no engine)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ssd_core import BackendSpec, ConfigError, Model

from ._model import NgramModel

__all__ = ["BACKEND", "NgramModel", "parse_spec"]

_INT_KEYS = {
    "max_n": "max_n",
    "n": "max_n",
    "vocab": "vocab_size",
    "vocab_size": "vocab_size",
    "context": "context_size",
    "context_size": "context_size",
}
_FLOAT_KEYS = {"alpha": "alpha"}


def parse_spec(args: str) -> dict[str, Any]:
    """Parse ``max_n=3,alpha=0.01`` into :class:`NgramModel` arguments.

    Raises:
        ConfigError: an item is not ``key=value``, the key is unknown, or the value bad.
    """
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in args.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"ngram spec item {part!r} is not key=value")
        try:
            if key in _INT_KEYS:
                out[_INT_KEYS[key]] = int(value)
            elif key in _FLOAT_KEYS:
                out[_FLOAT_KEYS[key]] = float(value)
            else:
                known = ", ".join(sorted({*_INT_KEYS, *_FLOAT_KEYS}))
                raise ConfigError(f"unknown ngram spec key {key!r}; known: {known}")
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"ngram spec {key}={value!r}: {exc}") from None
    return out


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
