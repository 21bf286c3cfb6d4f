"""The application layer: the ``ssd`` command, ``ssd bench``, the backend registry and
the bundled prompt set.

It sits *above* the engine: it imports only :mod:`ssd_core`'s public names, and nothing
in the engine imports it (``tests/core/test_layering.py`` checks the import graph).
Importing this package is cheap: the command-line modules load only when used.
"""

from __future__ import annotations

from .prompts import default_prompts
from .registry import BackendSpec, available_backends, load_backend

__all__ = ["BackendSpec", "available_backends", "default_prompts", "load_backend"]
