"""The optional oracle check: the model's rows against a reference scorer's.

Every other check compares a model only with itself, so a fault that is the same on
every handle -- a temperature baked into the logits, the wrong weights, a vocabulary
off by one id -- passes them all. Given a *reference* (``context -> logits``, e.g. the
same weights run through transformers, or logits stored from such a run), this check
compares the model's rows with it, within the backend's tolerance, and reports the
worst row with its context.

Rows are compared as log-probabilities (each row minus its logsumexp): a constant
added to a whole row changes no sampling decision, so it is not a fault.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np

from ssd_core import ConfigError

from ._arrays import max_abs_diff, to_numpy
from ._checks_output import seq_len
from ._probe import Fault, Probe, Skip, _shift_hints
from ._settings import Settings

__all__ = ["Reference", "check_reference", "log_softmax", "validate_reference"]

#: A reference scorer: ``context -> logits`` (1-D, ``vocab_size`` long, after the
#: context), or stored logits: a mapping from contexts to such rows.
Reference = Callable[[tuple[int, ...]], Any] | Mapping[Sequence[int], Any]

#: The least tolerance of the comparison: the log-softmax the suite applies to both
#: rows rounds, so rows equal up to a constant differ by this much in float64.
LOG_SOFTMAX_ROUNDING = 1e-9

#: What the check's row says when no reference is given.
NO_REFERENCE = (
    "no reference scorer given (reference=, --reference): the suite compares the model "
    "only with itself, so faults that are the same on every handle -- rescaled logits, a "
    "temperature baked in, wrong weights -- pass every other check"
)


def validate_reference(reference: object) -> Reference:
    """Check a reference before any work.

    Raises:
        ConfigError: it is neither callable nor a mapping, or a stored context is empty
            or not a sequence of ints.
    """
    if isinstance(reference, Mapping):
        if not reference:
            raise ConfigError("reference: the stored logits mapping is empty")
        for key in reference:
            if isinstance(key, (str, bytes)) or not isinstance(key, Sequence):
                raise ConfigError(f"reference: stored context {key!r} is not a sequence of ids")
            if not key or not all(isinstance(t, (int, np.integer)) for t in key):
                raise ConfigError(
                    f"reference: stored context {key!r} must hold at least one token id "
                    f"(the logits follow the context's last token)"
                )
        return reference
    if callable(reference):
        return reference
    raise ConfigError(
        f"reference must be a context -> logits callable or a mapping of stored logits, "
        f"got {type(reference).__name__}"
    )


def log_softmax(rows: np.ndarray) -> np.ndarray:
    """Each row minus its logsumexp (``-inf`` entries stay ``-inf``)."""
    top = np.max(rows, axis=-1, keepdims=True)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        lse = top + np.log(np.sum(np.exp(rows - top), axis=-1, keepdims=True))
    return np.asarray(rows - lse)


@attrs.frozen
class _Worst:
    diff: float
    context: tuple[int, ...]
    got: np.ndarray
    want: np.ndarray


def check_reference(reference: Reference | None, p: Probe, s: Settings) -> str:
    """The model's rows equal a reference scorer's, within the backend's tolerance.

    A callable is asked about every prefix of a few random sequences (3 of ``seq_len``
    tokens quick, 8 full), each scored by the model in one ``open([])`` + ``extend``;
    stored logits are checked at every stored context (those longer than
    ``context_size`` are left out).

    Raises:
        Skip: no reference was given, or none of its stored contexts fits.
        Fault: a row differs by more than ``s.reference_tolerance`` (default: the
            larger of the two model tolerances; at least :data:`LOG_SOFTMAX_ROUNDING`),
            or the reference's answer is unusable.
    """
    if reference is None:
        raise Skip(NO_REFERENCE)
    tol = (
        s.reference_tolerance
        if s.reference_tolerance is not None
        else max(p.tolerance, p.batch_tolerance)
    )
    tol = max(tol, LOG_SOFTMAX_ROUNDING)
    pairs: list[tuple[tuple[int, ...], np.ndarray, np.ndarray]] = []  # context, got, want
    sequences: list[tuple[int, int]] = []  # (first pair, length) of each scored sequence
    left_out = 0
    if isinstance(reference, Mapping):
        for key, stored in reference.items():
            ctx = tuple(int(t) for t in key)
            if not p.fits(len(ctx)):
                left_out += 1
                continue
            if not all(0 <= t < p.vocab for t in ctx):
                raise Fault(f"stored context {list(ctx)} holds ids outside [0, {p.vocab})")
            got = p.fresh(ctx)
            pairs.append(
                (ctx, got, _reference_row(functools.partial(_stored, stored), ctx, p.vocab))
            )
        if not pairs:
            raise Skip(f"none of the {left_out} stored contexts fits context_size {p.room}")
    else:
        n_seq = 3 if s.quick else 8
        length = seq_len(p, s)
        for i in range(n_seq):
            seq = p.tokens(length)
            h = p.open([], f"open([]) for reference sequence {i}")
            rows = p.extend_one(h, seq, f"extend of reference sequence {i} ({length} tokens)")
            p.close(h, "close")
            sequences.append((len(pairs), length))
            for j in range(length):
                ctx = tuple(seq[: j + 1])
                p.step = f"reference({list(ctx)})"
                want = _reference_row(reference, ctx, p.vocab)
                pairs.append((ctx, rows[j], want))
    got_lp = np.stack([log_softmax(g) for _, g, _ in pairs])
    want_lp = np.stack([log_softmax(w) for _, _, w in pairs])
    diffs = [p.diff(g, w) for g, w in zip(got_lp, want_lp, strict=True)]
    figure = f"{len(pairs)} rows, max|diff| {max(diffs):.3g}"
    if left_out:
        figure += f" ({left_out} stored contexts past context_size left out)"
    bad = [i for i, d in enumerate(diffs) if d > tol]
    if not bad:
        return figure
    k = max(bad, key=lambda i: diffs[i])
    ctx = pairs[k][0]
    worst_id = int(np.argmax(np.nan_to_num(np.abs(got_lp[k] - want_lp[k]), posinf=np.inf)))
    shown = list(ctx) if len(ctx) <= 12 else [*ctx[:4], "...", *ctx[-6:]]
    message = (
        f"{len(bad)} of {len(pairs)} rows differ from the reference scorer by more than "
        f"the tolerance {tol:g} (compared as log-probabilities): the worst, max |diff| "
        f"{diffs[k]:.3g}, is the row after the {len(ctx)}-token context {shown} (token id "
        f"{worst_id} differs most: {got_lp[k][worst_id]:.4g} vs {want_lp[k][worst_id]:.4g})."
    )
    hints = _hints(got_lp, want_lp, pairs, sequences, tol)
    if hints:
        message += " " + " ".join(hints)
    raise Fault(message)


def _stored(row: Any, context: tuple[int, ...]) -> Any:
    return row


def _reference_row(
    scorer: Callable[[tuple[int, ...]], Any], ctx: tuple[int, ...], vocab: int
) -> np.ndarray:
    try:
        raw = scorer(ctx)
    except Exception as exc:
        raise Fault(
            f"the reference scorer raised {type(exc).__name__} for context {list(ctx)}: {exc}"
        ) from exc
    try:
        row = to_numpy(raw)
    except (TypeError, ValueError) as exc:
        raise Fault(f"the reference's answer for {list(ctx)} is not a logits row: {exc}") from exc
    if row.ndim == 2 and row.shape[0] == 1:
        row = row[0]
    if row.shape != (vocab,):
        raise Fault(
            f"the reference returned shape {tuple(row.shape)} for the {len(ctx)}-token context "
            f"{list(ctx)}; expected ({vocab},), one logits row after the context (a padded "
            f"vocabulary must be cut to the model's vocab_size)"
        )
    if np.isnan(row).any() or (row == np.inf).any():
        raise Fault(f"the reference returned NaN or +inf logits for context {list(ctx)}")
    return row


def _hints(
    got: np.ndarray,
    want: np.ndarray,
    pairs: Sequence[tuple[tuple[int, ...], np.ndarray, np.ndarray]],
    sequences: Sequence[tuple[int, int]],
    tol: float,
) -> list[str]:
    """Recognise the usual culprits: a scale (temperature), ids shifted by one, rows
    from the wrong position."""
    hints = []
    scale = _common_scale(got, want, tol)
    if scale is not None:
        hints.append(
            f"Every row is the reference's times {scale:.4g}: the model's logits look "
            f"rescaled, as by a temperature of {1 / scale:.3g} baked into the backend (it "
            f"must return raw logits; the core applies the temperature)."
        )
    for shift in (1, -1):
        if max_abs_diff(np.roll(want, shift, axis=1)[:, 1:-1], got[:, 1:-1]) <= tol:
            hints.append(
                f"Every row is the reference's with token ids shifted by {shift:+d} "
                f"(an off-by-one in the vocabulary)."
            )
    for start, n in sequences:
        found = _shift_hints(got[start : start + n], want[start : start + n], tol)
        if found:
            hints.append("The rows match " + found[0] + ".")
            break
    return hints


def _common_scale(got: np.ndarray, want: np.ndarray, tol: float) -> float | None:
    """``c`` with ``got == c * want`` (up to per-row constants) on every row, if one exists."""
    finite = np.isfinite(got) & np.isfinite(want)
    if not finite.all(axis=1).any():
        return None
    g = np.where(finite, got, 0.0)
    w = np.where(finite, want, 0.0)
    counts = np.maximum(finite.sum(axis=1, keepdims=True), 1)
    g = np.where(finite, g - g.sum(axis=1, keepdims=True) / counts, 0.0)
    w = np.where(finite, w - w.sum(axis=1, keepdims=True) / counts, 0.0)
    denom = float((w * w).sum())
    if denom <= 0.0:
        return None
    c = float((g * w).sum()) / denom
    if c <= 0.0 or abs(c - 1.0) < 1e-3:
        return None
    residual = float(np.abs(g - c * w).max())
    return c if residual <= max(tol, 1e-6 * float(np.abs(g).max())) else None
