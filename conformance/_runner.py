"""``check_model``: run every contract check on fresh models from a factory."""

from __future__ import annotations

import functools
import logging
import time
import zlib
from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from ssd_core import ConfigError, Model

from ._arrays import dtype_info
from ._checks_output import (
    check_attributes,
    check_capacity,
    check_empty_open,
    check_finite,
    check_invalid_tokens,
    check_shapes,
)
from ._checks_reference import Reference, check_reference, validate_reference
from ._checks_state import (
    check_batched_vs_separate,
    check_close,
    check_determinism,
    check_extend_vs_prefill,
    check_fork_independence,
    check_fork_tree,
    check_handle_errors,
    check_many_handles,
    check_truncate,
)
from ._probe import Fault, Probe, Skip, free_model
from ._report import CheckResult, ConformanceError, Report, Status
from ._settings import Settings, default_tolerance
from ._walk import run_walk
from ._watchdog import DEFAULT_TIMEOUT, CheckTimeout, call_with_timeout

__all__ = ["CHECK_NAMES", "assert_conforms", "check_model", "describe_checks"]

log = logging.getLogger("conformance")

ModelFactory = Callable[[], Model]
CheckFn = Callable[[Probe, Settings], str]

_CHECKS: tuple[tuple[str, CheckFn], ...] = (
    ("attributes", check_attributes),
    ("shapes_dtypes", check_shapes),
    ("empty_open", check_empty_open),
    ("no_nan_inf", check_finite),
    ("determinism", check_determinism),
    ("extend_vs_prefill", check_extend_vs_prefill),
    ("batched_vs_separate", check_batched_vs_separate),
    ("fork_independence", check_fork_independence),
    ("fork_tree", check_fork_tree),
    ("truncate_reextend", check_truncate),
    ("close", check_close),
    ("handle_errors", check_handle_errors),
    ("many_handles", check_many_handles),
    ("invalid_tokens", check_invalid_tokens),
    ("context_capacity", check_capacity),
)
REFERENCE = "reference_logits"
WALK = "stateful_walk"

#: Every check ``check_model`` runs, in order.
CHECK_NAMES: tuple[str, ...] = (*(name for name, _ in _CHECKS), REFERENCE, WALK)


def describe_checks() -> dict[str, str]:
    """Each check's name mapped to the first line of its docstring."""
    out = {
        name: (fn.__doc__ or "").strip().splitlines()[0].replace("``", "") for name, fn in _CHECKS
    }
    out[REFERENCE] = (
        "The model's rows equal a reference scorer's (optional: pass reference=, "
        "skipped without one)."
    )
    out[WALK] = (
        "A seeded random walk over open/extend/fork/truncate/close, every row checked "
        "against a fresh handle; failures are shrunk."
    )
    return out


def _survey(make_model: ModelFactory) -> tuple[str | None, float]:
    """Build one model to learn its name and the default tolerance for its logits dtype.

    Returns:
        ``(name or None, tolerance)``; float32's tolerance if the model cannot be
        built or scored (the checks then report what is wrong).
    """
    name: str | None = None
    try:
        model = make_model()
        name = str(model.name)
        handle = model.open([])
        out = model.extend([(handle, [0])])
        model.close(handle)
        free_model(model)  # a failing free() is reported by every check
    except Exception as exc:  # reported by the checks themselves, with context
        log.debug("could not probe the logits dtype (%s); assuming float32", exc)
        return name, default_tolerance(32)
    return name, default_tolerance(dtype_info(out).bits or 32)


def _auto_tolerance(make_model: ModelFactory) -> float:
    """The default tolerance for the dtype a fresh model's logits come in."""
    return _survey(make_model)[1]


class _Progress:
    """What a check is doing, readable from the thread that waits for it."""

    def __init__(self) -> None:
        self.probe: Probe | None = None
        self.where = "make_model()"

    @property
    def step(self) -> str:
        return self.probe.step if self.probe is not None else self.where


def _run_check(
    name: str,
    fn: CheckFn,
    make_model: ModelFactory,
    settings: Settings,
    tol: float,
    btol: float,
    progress: _Progress | None = None,
) -> CheckResult:
    progress = progress if progress is not None else _Progress()
    start = time.perf_counter()
    status, measured, message = Status.PASSED, "", ""
    probe: Probe | None = None
    model: Model | None = None
    try:
        model = make_model()
        progress.where = "reading model.vocab_size"
        rng = np.random.default_rng([settings.seed, zlib.crc32(name.encode())])
        probe = progress.probe = Probe(model, tolerance=tol, batch_tolerance=btol, rng=rng)
        measured = fn(probe, settings)
    except Skip as exc:
        status, message = Status.SKIPPED, str(exc)
    except Fault as exc:
        status, message = Status.FAILED, str(exc)
    except Exception as exc:
        status, message = Status.FAILED, f"{progress.step}: raised {type(exc).__name__}: {exc}"
    problems = probe.cleanup() if probe is not None else []
    if model is not None:
        problems.append(free_model(model) or "")
    problems = [line for line in problems if line]
    if problems and status is Status.PASSED:
        status, message = Status.FAILED, "; ".join(problems)
    if probe is not None and status is Status.FAILED and probe.max_diff > 0:
        measured = f"max|diff| {probe.max_diff:.3g}"
    seconds = time.perf_counter() - start
    log.debug("%s: %s in %.2fs %s", name, status.value, seconds, message)
    return CheckResult(
        name=name, status=status, measured=measured, message=message, seconds=seconds
    )


def _timed_out_row(name: str, exc: CheckTimeout, doing: str) -> CheckResult:
    return CheckResult(
        name=name,
        status=Status.FAILED,
        message=(
            f"timed out after {exc.seconds:g} s (timeout={exc.seconds:g}) during {doing}; "
            f"the check was abandoned and the remaining checks were not run. Its thread "
            f"may keep running while the backend is stuck (Python cannot interrupt a "
            f"native call)."
        ),
        measured=f"timeout {exc.seconds:g} s",
        seconds=exc.seconds,
    )


def _not_run(name: str, culprit: str) -> CheckResult:
    return CheckResult(
        name=name,
        status=Status.SKIPPED,
        message=f"not run: {culprit} timed out, and the backend may still be busy in it",
    )


def check_model(
    make_model: ModelFactory,
    *,
    tolerance: float | None = None,
    batch_tolerance: float | None = None,
    quick: bool = True,
    seed: int = 0,
    n_handles: int = 32,
    only: Collection[str] | None = None,
    settings: Settings | None = None,
    subject: str | None = None,
    reference: Reference | None = None,
    reference_tolerance: float | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> Report:
    """Check a backend's models against the Model protocol.

    Every check builds its own model with ``make_model()``, so one broken check cannot
    spoil the next. Checks compare the model with itself (a handle against a
    brand-new handle holding the same tokens), so any backend can be checked without
    a reference implementation; give ``reference`` to also compare it with an
    independent one (``reference_logits``), which is the only way to see a fault that
    is the same on every handle, such as rescaled logits.

    Each check runs in a worker thread for at most ``timeout`` seconds; a check that
    takes longer fails ("timed out"), is abandoned (its thread may keep running if
    the backend is stuck in a native call), and the remaining checks are skipped.

    Args:
        make_model: zero-argument factory returning a fresh model.
        tolerance: largest absolute logits difference accepted where the protocol asks
            for equality. ``None``: 0 (exact) for float64 logits, 1e-4 for float32,
            1e-2 for 16-bit.
        batch_tolerance: the same for batched vs separate scoring; ``None``: ``tolerance``.
        quick: the short run (``--quick``); ``False`` for the long one.
        seed: seed for token sequences and the random walk (runs are reproducible).
        n_handles: handles that must be open at once.
        only: run just these checks (names from :data:`CHECK_NAMES`).
        settings: a full :class:`Settings`; overrides the keyword knobs above
            (``tolerance`` through ``n_handles``, ``reference_tolerance``, ``timeout``).
        subject: the report's subject; default: the model's name.
        reference: a reference scorer for the ``reference_logits`` check: a callable
            ``context -> logits`` (``context`` a tuple of ids, at least one; the result
            one ``vocab_size`` row, numpy or torch), or stored logits as a mapping from
            contexts to rows. ``None``: that check is skipped, saying what it misses.
        reference_tolerance: the largest difference accepted against the reference,
            compared as log-probabilities; ``None``: the larger of the two tolerances.
        timeout: seconds per check (``None``: no limit); see above.

    Returns:
        A :class:`Report` with one row per check.

    Raises:
        ConfigError: an unknown name in ``only``, an invalid setting, or a reference
            that is neither callable nor a mapping of non-empty contexts.
    """
    if settings is None:
        settings = Settings(
            tolerance=tolerance,
            batch_tolerance=batch_tolerance,
            quick=quick,
            seed=seed,
            n_handles=n_handles,
            reference_tolerance=reference_tolerance,
            timeout=timeout,
        )
    if only is not None:
        unknown = sorted(set(only) - set(CHECK_NAMES))
        if unknown:
            raise ConfigError(f"unknown checks {unknown}; known: {', '.join(CHECK_NAMES)}")
    if reference is not None:
        reference = validate_reference(reference)
    start = time.perf_counter()
    table: list[tuple[str, CheckFn]] = [
        *_CHECKS,
        (REFERENCE, functools.partial(check_reference, reference)),
        (WALK, functools.partial(_walk, make_model)),
    ]
    table = [(name, fn) for name, fn in table if only is None or name in only]
    try:
        model_name, auto_tol = call_with_timeout(
            functools.partial(_survey, make_model), settings.timeout, name="survey"
        )
    except CheckTimeout as exc:
        survey = _timed_out_row("survey", exc, "make_model() and a one-token extend")
        return Report(
            subject=subject or _subject(make_model, None),
            rows=(survey, *(_not_run(name, "survey") for name, _ in table)),
            settings=settings.describe(default_tolerance(32), default_tolerance(32)),
            seconds=time.perf_counter() - start,
        )
    tol = settings.tolerance if settings.tolerance is not None else auto_tol
    btol = settings.batch_tolerance if settings.batch_tolerance is not None else tol
    rows: list[CheckResult] = []
    hung: str | None = None  # the check that timed out: the rest are not run
    for name, fn in table:
        if hung is not None:
            rows.append(_not_run(name, hung))
            continue
        progress = _Progress()
        run = functools.partial(_run_check, name, fn, make_model, settings, tol, btol, progress)
        try:
            rows.append(call_with_timeout(run, settings.timeout, name=name))
        except CheckTimeout as exc:
            rows.append(_timed_out_row(name, exc, progress.step))
            hung = name
    return Report(
        subject=subject or _subject(make_model, model_name),
        rows=tuple(rows),
        settings=settings.describe(tol, btol, reference=reference is not None),
        seconds=time.perf_counter() - start,
    )


def _walk(make_model: ModelFactory, p: Probe, s: Settings) -> str:
    return run_walk(make_model, p, s)


def _subject(make_model: ModelFactory, model_name: str | None) -> str:
    factory = getattr(make_model, "__qualname__", None) or repr(make_model)
    return f"{model_name} (from {factory})" if model_name else factory


def assert_conforms(make_model: ModelFactory, **kwargs: Any) -> Report:
    """Run :func:`check_model` and raise unless the model passed: the pytest one-liner.

    Example::

        def test_my_backend_conforms():
            conformance.assert_conforms(lambda: MyModel.load("tiny.bin"))

    Args:
        make_model: zero-argument factory returning a fresh model.
        **kwargs: passed to :func:`check_model`.

    Returns:
        The report (all checks passed or were skipped as not applicable).

    Raises:
        ConformanceError: a check failed, or every check was skipped; the message holds
            the report table.
    """
    report = check_model(make_model, **kwargs)
    report.raise_for_failures()
    if not report.passed:
        raise ConformanceError(report)
    return report
