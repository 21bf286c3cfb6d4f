"""A registered backend whose engine is missing (for the skip test)."""

from __future__ import annotations

from ssd_core.app import BackendSpec


def _load(args, options):  # type: ignore[no-untyped-def]
    import ghost_engine_that_is_not_installed  # noqa: F401

    raise AssertionError("unreachable")


BACKEND = BackendSpec(name="ghost", load=_load, default_target="ghost:tiny")


def _load_missing_file(args, options):  # type: ignore[no-untyped-def]
    raise FileNotFoundError(f"no model file {args!r}")


BROKEN_LOAD = BackendSpec(name="ghost", load=_load_missing_file, default_target="ghost:tiny.bin")


def _load_draft_only(args, options):  # type: ignore[no-untyped-def]
    from backends.reference import ReferenceModel

    return ReferenceModel.random(vocab_size=int(options["vocab_size"]), order=1)


DRAFT_ONLY = BackendSpec(name="ghost", load=_load_draft_only, default_draft="ghost:")
