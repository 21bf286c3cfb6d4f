"""Finding backends by name through the ``ssd.backends`` entry-point group.

A backend package advertises one :class:`BackendSpec` under the group, e.g. in its
``pyproject.toml``::

    [project.entry-points."ssd.backends"]
    mybackend = "my_package.ssd_backend:BACKEND"

The ``ssd`` command then accepts ``--backend mybackend`` and model specs of the form
``mybackend:ARGS``. Nothing is imported until a backend is asked for by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

import attrs

from ssd_core import Model, UnknownOptionError

__all__ = ["BackendSpec", "available_backends", "load_backend"]

GROUP = "ssd.backends"


@attrs.frozen(kw_only=True)
class BackendSpec:
    """How the CLI and the conformance runner build models of one backend.

    Attributes:
        name: the name users type (``--backend NAME``, ``NAME:ARGS`` specs).
        load: ``load(args, options) -> Model``; ``args`` is the text after ``NAME:``
            (a path, or ``key=value,...``), ``options`` the CLI's engine options
            (threads, device, dtype, context size, ...); unknown options are ignored.
        default_target: the spec used when ``--target`` is not given, or ``None``.
        default_draft: the spec used when ``--draft`` is not given, or ``None``.
        description: one line for ``ssd backends``.
    """

    name: str
    load: Callable[[str, Mapping[str, Any]], Model]
    default_target: str | None = None
    default_draft: str | None = None
    description: str = ""


def available_backends() -> dict[str, str]:
    """Names of the installed backends mapped to their entry-point targets (no import)."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def load_backend(name: str) -> BackendSpec:
    """Import the backend registered as ``name`` and return its :class:`BackendSpec`.

    Raises:
        UnknownOptionError: no backend of that name is installed.
    """
    for ep in entry_points(group=GROUP):
        if ep.name == name:
            spec = ep.load()
            if not isinstance(spec, BackendSpec):
                raise UnknownOptionError(
                    f"entry point {ep.value!r} for backend {name!r} is not a BackendSpec"
                )
            return spec
    known = ", ".join(sorted(available_backends())) or "none"
    raise UnknownOptionError(f"unknown backend {name!r}; installed backends: {known}")
