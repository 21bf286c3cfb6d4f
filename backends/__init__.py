"""In-house backends, one subpackage per engine.

Each subpackage imports its engine only inside itself, so ``import backends`` is cheap
and never fails for a missing engine. Backends are found by name through the
``ssd.backends`` entry-point group (see :func:`backends.load_backend`), so third-party
backends plug into the ``ssd`` command the same way.
"""

from __future__ import annotations

from ._registry import BackendSpec, available_backends, load_backend

__all__ = ["BackendSpec", "available_backends", "load_backend"]
