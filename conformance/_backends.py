"""Running the suite on an in-house or installed backend by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ssd_core import Model
from ssd_core.app import load_backend

from ._probe import free_model
from ._report import CheckResult, Report, Status
from ._runner import check_model
from ._watchdog import DEFAULT_TIMEOUT, CheckTimeout, call_with_timeout

__all__ = ["check_backend", "skipped_report"]


def skipped_report(subject: str, reason: str) -> Report:
    """A report with one skipped row: the suite could not run at all, and says why."""
    row = CheckResult(name="backend", status=Status.SKIPPED, message=reason)
    return Report(subject=subject, rows=(row,))


def check_backend(
    name: str,
    *,
    args: str | None = None,
    options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Report:
    """Run :func:`check_model` on models built through ``load_backend(name)``.

    Args:
        name: a registered backend (``reference``, ``llama_cpp``, ...).
        args: the text after ``NAME:`` in a model spec; default: the spec's
            ``conformance_target`` attribute if it has one (a small model for this
            suite), else its ``default_target``, else its ``default_draft``.
        options: engine options passed to ``BackendSpec.load``.
        **kwargs: passed to :func:`check_model`.

    Returns:
        The report; a single skipped row if the backend's engine is not installed
        (importing it or loading a model raised ImportError) or it has no default
        model; a single failed ``load`` row if loading raised anything else.

    Raises:
        UnknownOptionError: no backend called ``name`` is registered.
    """
    opts = dict(options or {})
    try:
        spec = load_backend(name)
    except ImportError as exc:
        return skipped_report(f"backend {name}", f"engine not installed: {exc}")
    if args is None:
        # A spec may name a small model meant for this suite (``conformance_target``, an
        # optional attribute); else its default target; else (draft-only) its draft.
        default = (
            getattr(spec, "conformance_target", None) or spec.default_target or spec.default_draft
        )
        if default is None:
            return skipped_report(
                f"backend {name}", "backend has neither default_target nor default_draft; pass args"
            )
        head, sep, tail = default.partition(":")
        args = tail if sep and head == name else default
        if spec.default_target is None:
            # A draft-only backend (ngram) takes the target's vocabulary from the
            # options; check it at a small one unless the caller chose.
            opts.setdefault("vocab_size", 64)
    subject = f"backend {name} ({name}:{args})"

    documented = getattr(spec, "conformance_tolerance", None)
    if documented is not None:
        # None (the CLI's "not given") means the backend's documented tolerance too
        for key in ("tolerance", "batch_tolerance"):
            if kwargs.get(key) is None:
                kwargs[key] = documented

    def make_model() -> Model:
        return spec.load(args, opts)

    settings = kwargs.get("settings")
    timeout = settings.timeout if settings is not None else kwargs.get("timeout", DEFAULT_TIMEOUT)
    try:
        # an engine imported lazily inside load() shows up here
        call_with_timeout(lambda: free_model(make_model()), timeout, name="load")
    except ImportError as exc:
        return skipped_report(subject, f"engine not installed: {exc}")
    except CheckTimeout as exc:
        row = CheckResult(
            name="load",
            status=Status.FAILED,
            measured=f"timeout {exc.seconds:g} s",
            message=f"load({args!r}, {opts!r}) timed out after {exc.seconds:g} s and was "
            f"abandoned (its thread may keep running)",
            seconds=exc.seconds,
        )
        return Report(subject=subject, rows=(row,))
    except Exception as exc:  # the model cannot even be built: one clear failed row
        row = CheckResult(
            name="load",
            status=Status.FAILED,
            message=f"load({args!r}, {opts!r}) raised {type(exc).__name__}: {exc}",
        )
        return Report(subject=subject, rows=(row,))
    return check_model(make_model, subject=subject, **kwargs)
