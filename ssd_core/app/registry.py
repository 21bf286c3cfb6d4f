"""Finding backends by name through the ``ssd.backends`` entry-point group.

A backend package advertises one :class:`BackendSpec` under the group, e.g. in its
``pyproject.toml``::

    [project.entry-points."ssd.backends"]
    mybackend = "my_package.ssd_backend:BACKEND"

The ``ssd`` command then accepts ``--backend mybackend`` and model specs of the form
``mybackend:ARGS``. Nothing is imported until a backend is asked for by name, and the
core never imports a backend statically: it knows the in-house ones only by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

import attrs

from ssd_core import Model, UnknownOptionError

__all__ = ["BackendSpec", "available_backends", "load_backend"]

GROUP = "ssd.backends"

#: The in-house backends, so a source checkout finds them without being installed.
#: Entry points with the same name take precedence.
IN_HOUSE = {
    "reference": "backends.reference:BACKEND",
    "llama_cpp": "backends.llama_cpp:BACKEND",
    "ngram": "backends.ngram:BACKEND",
    "onnxruntime": "backends.onnxruntime:BACKEND",
    "torch": "backends.torch:BACKEND",
}


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
        conformance_target: a small model spec the conformance suite's fast tier
            builds (e.g. a tiny random-weight model the backend writes itself), or
            ``None`` to check the default model in the slow tier only.
        conformance_tolerance: the largest logits difference the backend documents
            between two computations of the same tokens (batch shape, cache layout),
            or ``None`` for the suite's default for the logits' dtype.
    """

    name: str
    load: Callable[[str, Mapping[str, Any]], Model]
    default_target: str | None = None
    default_draft: str | None = None
    description: str = ""
    conformance_target: str | None = None
    conformance_tolerance: float | None = None


def available_backends() -> dict[str, str]:
    """Backend names mapped to their ``module:attribute`` targets (nothing is imported)."""
    found = dict(IN_HOUSE)
    found.update({ep.name: ep.value for ep in entry_points(group=GROUP)})
    return found


def load_backend(name: str) -> BackendSpec:
    """Import the backend registered as ``name`` and return its :class:`BackendSpec`.

    Raises:
        UnknownOptionError: no backend of that name is installed.
    """
    targets = available_backends()
    if name not in targets:
        known = ", ".join(sorted(targets)) or "none"
        raise UnknownOptionError(f"unknown backend {name!r}; installed backends: {known}")
    module_name, _, attr = targets[name].partition(":")
    spec = getattr(import_module(module_name), attr)
    if not isinstance(spec, BackendSpec):
        raise UnknownOptionError(f"{targets[name]!r} for backend {name!r} is not a BackendSpec")
    return spec
