"""``ssd serve``: an OpenAI-compatible HTTP server on the continuous-batching
:class:`ssd_core.Engine`.

One engine serves every client for the server's life: requests join and leave it
between rounds, so many clients share one draft/target pair. See ``docs/serving.md``.

Modules: :mod:`.options` (flags and settings; imports no web framework, so the ``ssd``
command stays cheap to start), :mod:`.schemas` (request shapes), :mod:`.app` (the
routes, :func:`~.app.create_app`), :mod:`.metrics` (Prometheus), :mod:`.errors`
(OpenAI-style error bodies) and :mod:`.server` (uvicorn, graceful shutdown,
:func:`~.server.run_serve`). Those need the ``serve`` extra
(``pip install "ssd-saguaro[serve]"``).
"""

from __future__ import annotations

import argparse

from ssd_core import SSDError

from .options import RequestDefaults, ServeOptions, add_serve_args, options_from

__all__ = ["RequestDefaults", "ServeOptions", "add_serve_args", "options_from", "run_serve"]


def run_serve(args: argparse.Namespace) -> int:
    """``ssd serve`` (see :func:`.server.run_serve`), with a clear error when the
    ``serve`` extra is not installed.

    Raises:
        SSDError: the extra is missing, or the server could not start.
    """
    try:
        from .server import run_serve as run
    except ImportError as exc:
        raise SSDError(
            f'ssd serve needs the serve extra: pip install "ssd-saguaro[serve]" ({exc})'
        ) from exc
    return run(args)
