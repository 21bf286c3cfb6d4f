"""The harness every check drives a model through.

A :class:`Probe` wraps one model for one check. It validates every logits array the
model returns (type, shape, dtype, NaN/+inf) so that *every* check also enforces the
output contract, keeps track of the handles the check opened so they can be closed
afterwards, computes "fresh" logits for any context on a brand-new handle (the
oracle most checks compare against), and remembers the largest difference it saw,
which becomes the check's measured figure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ssd_core import CapacityError, Handle, Model

from ._arrays import DtypeInfo, dtype_info, max_abs_diff, to_numpy

__all__ = ["Fault", "Probe", "Skip", "describe_permutation", "find_permutation", "free_model"]

Context = tuple[int, ...]


class Fault(Exception):
    """Raised inside a check when the model broke the contract; the message says how."""


class Skip(Exception):
    """Raised inside a check that does not apply to this model; the message says why."""


class Probe:
    """One model under test, seen through validating, bookkeeping wrappers.

    Args:
        model: the model under test.
        tolerance: absolute logits tolerance for "must be equal" comparisons.
        batch_tolerance: the same, for batched vs separate comparisons.
        rng: the check's random generator (token sequences).
    """

    def __init__(
        self, model: Model, *, tolerance: float, batch_tolerance: float, rng: np.random.Generator
    ) -> None:
        self.model = model
        self.vocab = int(model.vocab_size)
        self.tolerance = tolerance
        self.batch_tolerance = batch_tolerance
        self.rng = rng
        self.max_diff = 0.0
        self.dtype: DtypeInfo | None = None
        #: What the check is doing right now, for messages about unexpected exceptions.
        self.step = "starting"
        self._live: dict[Handle, None] = {}
        self._fresh: dict[Context, np.ndarray] = {}

    # -- plumbing ---------------------------------------------------------------------

    def tokens(self, n: int) -> list[int]:
        """``n`` random valid token ids."""
        return [int(t) for t in self.rng.integers(0, self.vocab, size=n)]

    def open(self, tokens: Sequence[int], what: str = "") -> Handle:
        """``model.open(tokens)``, tracking the new handle."""
        self.step = what or f"open({len(tokens)} tokens)"
        handle = self.model.open(list(tokens))
        self._live[handle] = None
        return handle

    def fork(self, handle: Handle, length: int, what: str = "") -> Handle:
        """``model.fork(handle, length)``, tracking the new handle."""
        self.step = what or f"fork(handle, {length})"
        child = self.model.fork(handle, length)
        self._live[child] = None
        return child

    def truncate(self, handle: Handle, length: int, what: str = "") -> None:
        """``model.truncate(handle, length)``."""
        self.step = what or f"truncate(handle, {length})"
        self.model.truncate(handle, length)

    def close(self, handle: Handle, what: str = "") -> None:
        """``model.close(handle)``, forgetting the handle."""
        self.step = what or "close(handle)"
        self.model.close(handle)
        self._live.pop(handle, None)

    def forget(self, handle: Handle) -> None:
        """Stop tracking ``handle`` (the check closed it through the raw model)."""
        self._live.pop(handle, None)

    def cleanup(self) -> list[str]:
        """Close every handle the check left open.

        Returns:
            One line per handle whose ``close`` raised (empty when all went well).
        """
        problems = []
        for handle in list(self._live):
            try:
                self.model.close(handle)
            except Exception as exc:  # reported as a failure of the check, not swallowed
                problems.append(f"close({handle!r}) at the end raised {type(exc).__name__}: {exc}")
        self._live.clear()
        return problems

    def expect_raise(
        self, exc_type: type[BaseException], call: Callable[[], object], what: str
    ) -> None:
        """Require ``call()`` to raise ``exc_type``.

        Raises:
            Fault: it returned normally, or raised something else.
        """
        self.step = what
        try:
            call()
        except exc_type:
            return
        except Exception as exc:
            raise Fault(
                f"{what} raised {type(exc).__name__}: {exc}; the protocol requires "
                f"{exc_type.__module__.split('.')[0]}.{exc_type.__name__}"
            ) from exc
        raise Fault(f"{what} returned normally; the protocol requires {exc_type.__name__}")

    # -- logits -------------------------------------------------------------------------

    def extend(
        self, requests: Sequence[tuple[Handle, Sequence[int]]], what: str = ""
    ) -> list[np.ndarray]:
        """``model.extend(requests)``, validated and split per request.

        Returns:
            One float64 array per request, ``len(tokens)`` rows each.

        Raises:
            Fault: the result is not a 2-D real-float array of the right shape, or
                holds NaN, ``+inf``, or a row that is entirely ``-inf``.
        """
        self.step = what or f"extend({len(requests)} requests)"
        reqs = [(h, list(toks)) for h, toks in requests]
        out = self.model.extend(reqs)
        where = f"{self.step}: extend returned"
        if out is None:
            raise Fault(f"{where} None instead of a 2-D logits array")
        info = dtype_info(out)
        if not info.real_float:
            raise Fault(f"{where} dtype {info.name}; logits must be a real floating dtype")
        if self.dtype is None:
            self.dtype = info
        try:
            arr = to_numpy(out)
        except (TypeError, ValueError) as exc:
            raise Fault(f"{where} {type(out).__name__} that numpy cannot read: {exc}") from exc
        n_rows = sum(len(t) for _, t in reqs)
        if arr.ndim != 2 or arr.shape != (n_rows, self.vocab):
            raise Fault(
                f"{where} shape {tuple(arr.shape)}; expected ({n_rows}, {self.vocab}): one row "
                f"per appended token ({' + '.join(str(len(t)) for _, t in reqs)}) and vocab_size "
                f"columns"
            )
        bad = np.isnan(arr) | (arr == np.inf)
        dead = np.all(arr == -np.inf, axis=1)
        if bad.any() or dead.any():
            row = int(np.argmax(bad.any(axis=1) | dead))
            req, pos = _locate(row, [len(t) for _, t in reqs])
            kind = (
                "entirely -inf (no token possible)"
                if dead[row]
                else (
                    f"{int(bad[row].sum())} NaN/+inf entries (first at token id {int(np.argmax(bad[row]))})"
                )
            )
            raise Fault(f"{where} {kind} in row {row} (request {req}, appended token {pos})")
        split, start = [], 0
        for _, toks in reqs:
            split.append(arr[start : start + len(toks)])
            start += len(toks)
        return split

    def extend_one(self, handle: Handle, tokens: Sequence[int], what: str = "") -> np.ndarray:
        """Extend a single handle; returns its rows."""
        return self.extend([(handle, tokens)], what)[0]

    def fresh(self, context: Sequence[int]) -> np.ndarray:
        """The logits after ``context`` from a brand-new handle (memoised).

        The last token is appended with ``extend``; the rest is the ``open`` prompt, so
        this is the plainest way the model can compute those logits.
        """
        key = tuple(int(t) for t in context)
        if not key:
            raise ValueError("fresh() needs a non-empty context")
        if key not in self._fresh:
            self._check_room(len(key))
            step = self.step
            try:
                handle = self.open(key[:-1], what=f"fresh handle for a {len(key)}-token context")
                self._fresh[key] = self.extend_one(
                    handle, key[-1:], what=f"oracle for {len(key)} tokens"
                )[0]
            except CapacityError as exc:
                raise self._oracle_capacity_fault(len(key), exc) from exc
            self.close(handle, what="closing a fresh oracle handle")
            self.step = step
        return self._fresh[key]

    @property
    def room(self) -> int | None:
        """The model's ``context_size`` (``None``: unbounded)."""
        room = self.model.context_size
        return None if room is None else int(room)

    def fits(self, n_tokens: int) -> bool:
        """Whether one handle may hold ``n_tokens`` tokens."""
        return self.room is None or n_tokens <= self.room

    def _check_room(self, n_tokens: int) -> None:
        # An oracle past context_size would raise CapacityError and hide the real
        # diagnosis; the checks never ask for one, and this keeps it that way.
        if not self.fits(n_tokens):
            raise ValueError(
                f"internal: oracle asked for {n_tokens} tokens past context_size {self.room}"
            )

    def _oracle_capacity_fault(self, n_tokens: int, exc: CapacityError) -> Fault:
        return Fault(
            f"{self.step}: the fresh handle the suite compares against ({n_tokens} tokens, "
            f"within context_size={self.room}) raised CapacityError: {exc}. A handle must "
            f"hold up to context_size tokens"
        )

    def fresh_block(self, before: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """Fresh logits for ``before + tokens`` from one new handle: ``open(before)``, then
        one ``extend(tokens)``.

        A from-scratch recomputation that costs one prefill however many tokens are
        scored (the random walk uses it). It shares the multi-token extend path with the
        handle under test, which ``extend_vs_prefill`` checks on its own.
        """
        ctx = [int(t) for t in before]
        keys = [tuple(ctx + [int(t) for t in tokens[: j + 1]]) for j in range(len(tokens))]
        if all(k in self._fresh for k in keys):
            return np.stack([self._fresh[k] for k in keys])
        self._check_room(len(keys[-1]) if keys else len(ctx))
        step = self.step
        try:
            handle = self.open(ctx, what=f"fresh handle for a {len(ctx)}-token context")
            rows = self.extend_one(
                handle, tokens, what=f"oracle for {len(ctx)}+{len(tokens)} tokens"
            )
        except CapacityError as exc:
            raise self._oracle_capacity_fault(len(ctx) + len(tokens), exc) from exc
        self.close(handle, what="closing a fresh oracle handle")
        self.step = step
        return rows

    def fresh_rows(self, before: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """Fresh logits for every position of ``before + tokens[:j+1]``."""
        ctx = list(before)
        rows = []
        for t in tokens:
            ctx.append(int(t))
            rows.append(self.fresh(ctx))
        return np.stack(rows)

    def diff(self, got: np.ndarray, want: np.ndarray) -> float:
        """``max |got - want|``, also recorded as the check's figure."""
        d = max_abs_diff(got, want)
        self.max_diff = max(self.max_diff, d)
        return d

    def expect_rows(
        self,
        handle: Handle,
        tokens: Sequence[int],
        before: Sequence[int],
        what: str,
        *,
        explain: Sequence[tuple[str, Sequence[int]]] = (),
    ) -> np.ndarray:
        """Extend ``handle`` (which should hold ``before``) and compare with fresh handles.

        Args:
            handle: the handle under test.
            tokens: tokens to append.
            before: what the handle should hold before the call.
            what: the step, for the failure message.
            explain: ``(label, other_context)`` pairs: on a mismatch, if the rows equal
                what a handle holding ``other_context`` would give, the message says
                "the rows match <label>".

        Returns:
            The returned rows.

        Raises:
            Fault: a row differs from the fresh logits by more than the tolerance.
        """
        got = self.extend_one(handle, tokens, what)
        want = self.fresh_rows(before, tokens)
        lazy = [
            (label, lambda alt=alt: self.fresh_rows(alt, tokens))
            for label, alt in explain
            if self.fits(len(alt) + len(tokens))
        ]
        self.compare(got, want, what, context_len=len(before), explain=lazy)
        return got

    def compare(
        self,
        got: np.ndarray,
        want: np.ndarray,
        what: str,
        *,
        context_len: int,
        tolerance: float | None = None,
        against: str = "a fresh handle holding the same tokens",
        explain: Sequence[tuple[str, Callable[[], np.ndarray]]] = (),
    ) -> None:
        """Compare returned rows with expected rows, row by row.

        ``explain`` holds ``(label, rows_fn)`` pairs, evaluated only on a mismatch: if
        the returned rows equal ``rows_fn()``, the message says they match ``label``.

        Raises:
            Fault: naming the first bad row, its position, the difference, the
                tolerance, and any explanation whose rows match.
        """
        tol = self.tolerance if tolerance is None else tolerance
        for j in range(len(want)):
            d = self.diff(got[j], want[j])
            if d > tol:
                msg = (
                    f"{what}: row {j} (logits after {context_len + j + 1} tokens) differs from "
                    f"{against}: max |diff| {d:.3g} > tolerance {tol:g}."
                )
                hints = [label for label, rows in explain if _matches(got, rows, tol)]
                hints = hints or _shift_hints(got, want, tol)
                if hints:
                    msg += " The returned rows match " + "; and ".join(hints) + "."
                raise Fault(msg)

    def compare_batch(
        self,
        got: Sequence[np.ndarray],
        want: Sequence[np.ndarray],
        what: str,
        *,
        labels: Sequence[str],
        context_lens: Sequence[int],
        tolerance: float | None = None,
        against: str = "a fresh handle holding the same tokens",
    ) -> None:
        """Compare the rows of every request of one batch with their expected rows.

        When the rows are all right but in the wrong places (requests swapped, rows
        permuted), the fault says so and names the requests; otherwise the first bad
        request is reported as :meth:`compare` does.

        Args:
            got: the returned rows, one array per request, in batch order.
            want: the expected rows, same layout.
            what: the step, for the message.
            labels: a name per request (``"request 0 (handle 7)"``).
            context_lens: tokens each request's handle held before the call.
            tolerance: default: :attr:`tolerance`.
            against: what the expected rows are, for the message.

        Raises:
            Fault: a row differs from its expected row by more than the tolerance.
        """
        tol = self.tolerance if tolerance is None else tolerance
        bad = [i for i in range(len(want)) if self.diff(got[i], want[i]) > tol]
        if bad and len(want) >= 2:
            src = find_permutation(np.concatenate(got), np.concatenate(want), tol)
            if src is not None:
                where = describe_permutation(src, [len(w) for w in want], labels)
                raise Fault(
                    f"{what}: rows in the wrong order: every returned row equals an expected "
                    f"row (within tolerance {tol:g}) but not in its own place: {where}. "
                    f"extend must return each request's rows in the order the requests were "
                    f"given (the first request's rows first)."
                )
        for i in bad:
            self.compare(
                got[i],
                want[i],
                f"{what}, {labels[i]}",
                context_len=context_lens[i],
                tolerance=tol,
                against=against,
            )


def find_permutation(got: np.ndarray, want: np.ndarray, tol: float) -> list[int] | None:
    """Match every returned row to a distinct expected row within ``tol``, if possible.

    Args:
        got: the returned rows, ``n x vocab``.
        want: the expected rows, same shape.
        tol: the tolerance.

    Returns:
        ``src`` with ``got[i]`` equal to ``want[src[i]]`` for every ``i`` (a row is kept
        in its own place whenever that works), or ``None`` when some returned row
        equals no expected row, or the matches cannot be made one-to-one.
    """
    n = len(want)
    if got.shape != want.shape or n > 512:  # too many rows for an n^2 search: no diagnosis
        return None
    ok = [[max_abs_diff(got[i], want[j]) <= tol for j in range(n)] for i in range(n)]
    owner = [-1] * n  # expected row -> returned row matched to it

    def assign(i: int, seen: list[bool]) -> bool:  # Kuhn's augmenting path
        for j in (i, *(j for j in range(n) if j != i)):
            if ok[i][j] and not seen[j]:
                seen[j] = True
                if owner[j] < 0 or assign(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    for i in range(n):
        if not assign(i, [False] * n):
            return None
    src = [0] * n
    for j, i in enumerate(owner):
        src[i] = j
    return src


def describe_permutation(src: Sequence[int], lengths: Sequence[int], labels: Sequence[str]) -> str:
    """Say where the misplaced rows came from.

    Whole requests in another order read "the rows came back in the order of request 1
    (handle 5), request 0 (handle 4)"; anything else names each misplaced request's
    rows ("the rows returned for request 0 (handle 4) are request 1 (handle 5) row 0,
    ...").

    Args:
        src: from :func:`find_permutation`, over the batch's rows.
        lengths: rows per request, in the order the requests were given.
        labels: a name per request.
    """
    starts = [sum(lengths[:a]) for a in range(len(lengths))]
    order: list[int] = []
    r = 0
    while r < len(src):
        b, k = _locate(src[r], lengths)
        if k != 0 or list(src[r : r + lengths[b]]) != list(
            range(starts[b], starts[b] + lengths[b])
        ):
            break
        order.append(b)
        r += lengths[b]
    if r == len(src) and sorted(order) == list(range(len(lengths))):
        return (
            "whole requests' rows came back in the order "
            + ", ".join(labels[b] for b in order)
            + " instead of "
            + ", ".join(labels)
        )
    parts = []
    for a, (start, n) in enumerate(zip(starts, lengths, strict=True)):
        sources = [_locate(src[start + k], lengths) for k in range(n)]
        if sources != [(a, k) for k in range(n)]:
            rows = ", ".join(f"{labels[b]} row {k}" for b, k in sources)
            parts.append(f"the rows returned for {labels[a]} are {rows}")
    return "; ".join(parts)


def _matches(got: np.ndarray, rows: Callable[[], np.ndarray], tol: float) -> bool:
    """Whether ``got`` equals the explanation's rows; ``False`` when they cannot be
    computed (the explanation then says nothing, and the real mismatch is reported)."""
    try:
        return max_abs_diff(got, rows()) <= tol
    except Exception:  # an explanation must never hide the diagnosis it explains
        return False


def _locate(row: int, lengths: Sequence[int]) -> tuple[int, int]:
    for i, n in enumerate(lengths):
        if row < n:
            return i, row
        row -= n
    return len(lengths), row


def _shift_hints(got: np.ndarray, want: np.ndarray, tol: float) -> list[str]:
    """Recognise rows that are the expected rows moved by one position (first match)."""
    n = len(want)
    hints: list[str] = []
    if n >= 2 and max_abs_diff(got[1:], want[:-1]) <= tol:
        hints.append("the expected rows one position earlier (each row lags one token behind)")
    if not hints and n >= 2 and max_abs_diff(got[:-1], want[1:]) <= tol:
        hints.append("the expected rows one position later (each row runs one token ahead)")
    if not hints and n >= 2 and max_abs_diff(got[1:], want[1:]) <= tol:
        hints.append(
            "the expected rows except the first (the first appended token's row comes from "
            "the wrong position)"
        )
    return hints


def free_model(model: object) -> str | None:
    """Call the model's optional ``free()`` (release engine context and weights at once).

    The suite builds many models (one per check); freeing each when its check ends
    keeps an engine's memory flat instead of waiting for the garbage collector.

    Returns:
        ``None``, or a line saying what ``free()`` raised (reported as a failure).
    """
    free = getattr(model, "free", None)
    if not callable(free):
        return None
    try:
        free()
    except Exception as exc:  # reported as a failure of the check, not swallowed
        return f"free() raised {type(exc).__name__}: {exc}"
    return None
