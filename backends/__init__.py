"""In-house backends, one subpackage per engine.

Each subpackage imports its engine only inside itself, so ``import backends`` is cheap
and never fails for a missing engine. Backends are found by name through the
``ssd.backends`` entry-point group (see :func:`ssd_core.load_backend`), so third-party
backends plug into the ``ssd`` command the same way.
"""
