"""Parsing the ``key=value,...`` text of a model spec (``reference:vocab=64,seed=1``).

One parser for every in-house backend, so specs behave the same everywhere: items are
comma-separated, keys map to constructor arguments through a table of converters, and
every mistake is a :class:`~ssd_core.ConfigError` naming the backend and the item.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ssd_core import ConfigError

__all__ = ["flag", "parse_spec_items", "plus_list"]

#: spec key -> (argument name, converter from the value text)
Keys = Mapping[str, tuple[str, Callable[[str], Any]]]


def flag(text: str) -> bool:
    """``1/true/yes/on`` -> True, ``0/false/no/off`` -> False."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a yes/no value")


def plus_list(text: str) -> list[str]:
    """``A+B`` -> ``["A", "B"]``."""
    return [p for p in text.split("+") if p]


def parse_spec_items(
    args: str, *, owner: str, keys: Keys, positional: str | None = None
) -> dict[str, Any]:
    """Parse ``args`` (the text after ``NAME:``) into keyword arguments.

    Args:
        args: comma-separated items, each ``key=value`` (or, once, a bare value).
        owner: the backend's name, for error messages.
        keys: the accepted keys, each mapped to (argument name, converter).
        positional: the argument a single bare item (a path, a model name) fills; with
            ``None`` a bare item is an error.

    Raises:
        ConfigError: an item without ``=`` where none is allowed, an unknown key, or a
            value its converter rejects.
    """
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in args.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep:
            if positional is None or positional in out:
                raise ConfigError(f"{owner} spec item {part!r} is not key=value")
            out[positional] = part
            continue
        if key not in keys:
            known = ", ".join(sorted(keys))
            raise ConfigError(f"unknown {owner} spec key {key!r}; known: {known}")
        name, convert = keys[key]
        try:
            out[name] = convert(value.strip())
        except ValueError as exc:
            raise ConfigError(f"{owner} spec {key}={value!r}: {exc}") from None
    return out
