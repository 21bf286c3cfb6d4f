"""Running the suite on an in-house or installed backend by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from backends import load_backend
from ssd_core import Model

from ._report import CheckResult, Report, Status
from ._runner import check_model

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
        args: the text after ``NAME:`` in a model spec; default: the backend's
            ``default_target``.
        options: engine options passed to ``BackendSpec.load``.
        **kwargs: passed to :func:`check_model`.

    Returns:
        The report; a single skipped row if the backend's engine is not installed
        (importing it or loading a model raised ImportError) or it has no default model.

    Raises:
        UnknownOptionError: no backend called ``name`` is registered.
    """
    opts = dict(options or {})
    try:
        spec = load_backend(name)
    except ImportError as exc:
        return skipped_report(f"backend {name}", f"engine not installed: {exc}")
    if args is None:
        if spec.default_target is None:
            return skipped_report(f"backend {name}", "backend has no default_target; pass args")
        head, sep, tail = spec.default_target.partition(":")
        args = tail if sep and head == name else spec.default_target
    subject = f"backend {name} ({name}:{args})"

    def make_model() -> Model:
        return spec.load(args, opts)

    try:
        make_model()
    except ImportError as exc:
        return skipped_report(subject, f"engine not installed: {exc}")
    return check_model(make_model, subject=subject, **kwargs)
