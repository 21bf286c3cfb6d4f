"""Deliberately broken backends: thin wrappers over ReferenceModel, each with one fault.

The conformance suite must catch every one of them with a message that points at the
fault. Each class names its bug in its docstring; ``BROKEN`` maps a short name to
``(factory, checks that must fail, text the message must contain)``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from backends.reference import ReferenceModel
from ssd_core import CapacityError, Handle


def reference(**kwargs: Any) -> ReferenceModel:
    """The model every broken backend wraps (order 2, so truncation and forks matter)."""
    kwargs.setdefault("vocab_size", 32)
    kwargs.setdefault("order", 2)
    kwargs.setdefault("seed", 3)
    return ReferenceModel.random(**kwargs)


class Wrapper:
    """Delegates everything to a ReferenceModel; subclasses override one method."""

    tokenizer = None

    def __init__(self, inner: ReferenceModel | None = None) -> None:
        self.inner = inner if inner is not None else reference()
        self.name = f"{type(self).__name__}"
        self.vocab_size = self.inner.vocab_size
        self.context_size = self.inner.context_size

    def open(self, tokens: Sequence[int]) -> Handle:
        return self.inner.open(tokens)

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> Any:
        return self.inner.extend(requests)

    def fork(self, handle: Handle, length: int) -> Handle:
        return self.inner.fork(handle, length)

    def truncate(self, handle: Handle, length: int) -> None:
        self.inner.truncate(handle, length)

    def close(self, handle: Handle) -> None:
        self.inner.close(handle)


class TruncateOffByOne(Wrapper):
    """``truncate(h, n)`` keeps ``n + 1`` tokens (a ``<=`` where ``<`` was meant)."""

    def truncate(self, handle: Handle, length: int) -> None:
        held = len(self.inner.tokens(handle))
        self.inner.truncate(handle, min(length + 1, held) if length >= 0 else length)


class ForkAliasing(Wrapper):
    """A "zero-copy" fork: ``fork(h, len(h))`` hands out a second name for the parent's
    own cache instead of a copy, so writes through either name reach both."""

    def __init__(self) -> None:
        super().__init__()
        self._alias: dict[Handle, Handle] = {}
        self._names: dict[Handle, int] = {}
        self._next = 10_000

    def _real(self, handle: Handle) -> Handle:
        return self._alias.get(handle, handle)

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> Any:
        return self.inner.extend([(self._real(h), t) for h, t in requests])

    def fork(self, handle: Handle, length: int) -> Handle:
        real = self._real(handle)
        if length != len(self.inner.tokens(real)):
            return self.inner.fork(real, length)
        self._next += 1
        self._alias[self._next] = real
        self._names[real] = self._names.get(real, 1) + 1
        return self._next

    def truncate(self, handle: Handle, length: int) -> None:
        self.inner.truncate(self._real(handle), length)

    def close(self, handle: Handle) -> None:
        real = self._alias.pop(handle, handle)
        self.inner.tokens(real)  # HandleError for unknown handles
        self._names[real] = self._names.get(real, 1) - 1
        if self._names[real] <= 0:
            del self._names[real]
            self.inner.close(real)


class StaleFirstRow(Wrapper):
    """Rows come from the wrong position: each extend returns the logits *before* each
    appended token, the first row taken from a model-wide buffer left by the previous
    call (llama.cpp's "copy the logits buffer before the next decode" trap)."""

    def __init__(self) -> None:
        super().__init__()
        self._last = np.zeros(self.vocab_size)

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> Any:
        true = self.inner.extend(requests)
        out = np.empty_like(true)
        out[0] = self._last
        out[1:] = true[:-1]
        self._last = true[-1].copy()
        return out


class RowsAhead(Wrapper):
    """Rows come from the wrong position: a multi-token extend returns row ``j + 1`` as
    row ``j`` (the last row repeated), e.g. a slice ``logits[1:]`` instead of ``[:-1]``."""

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> Any:
        true = self.inner.extend(requests)
        out, start = true.copy(), 0
        for _, toks in requests:
            n = len(toks)
            out[start : start + n - 1] = true[start + 1 : start + n]
            start += n
        return out


class Noisy(Wrapper):
    """Nondeterministic: tiny unseeded noise on every logit (an uninitialised buffer, a
    racy reduction)."""

    def __init__(self, scale: float = 1e-3) -> None:
        super().__init__()
        self.scale = scale
        self._rng = np.random.default_rng()

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> Any:
        out = self.inner.extend(requests)
        return out + self._rng.standard_normal(out.shape) * self.scale


class BatchDependent(Wrapper):
    """Logits shift with the number of requests in the batch (padding leaking into the
    attention, a kernel chosen by batch size), by ``scale`` per extra request."""

    def __init__(self, scale: float = 1e-3) -> None:
        super().__init__()
        self.scale = scale
        self._pattern = np.cos(np.arange(self.vocab_size))

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> Any:
        out = self.inner.extend(requests)
        return out + self.scale * (len(requests) - 1) * self._pattern


class CloseIsNoop(Wrapper):
    """``close`` does nothing: handles leak and stay usable after close."""

    def close(self, handle: Handle) -> None:
        self.inner.tokens(handle)


class ClipsTokens(Wrapper):
    """Out-of-range token ids are clipped into the vocabulary instead of rejected."""

    def _clip(self, tokens: Sequence[int]) -> list[int]:
        return [min(max(int(t), 0), self.vocab_size - 1) for t in tokens]

    def open(self, tokens: Sequence[int]) -> Handle:
        return self.inner.open(self._clip(tokens))

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> Any:
        return self.inner.extend([(h, self._clip(t)) for h, t in requests])


class ReturnsNaN(Wrapper):
    """Token 5's logit is NaN after any context ending in token 7 (an overflow)."""

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> Any:
        out = self.inner.extend(requests)
        flat = [t for _, toks in requests for t in toks]
        out[np.asarray(flat) == 7, 5] = np.nan
        return out


class WrongWidth(Wrapper):
    """Rows have ``vocab_size - 1`` columns (a padded/unpadded vocabulary mix-up)."""

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> Any:
        return self.inner.extend(requests)[:, :-1]


class FewHandles(Wrapper):
    """Holds at most ``limit`` handles at once (a fixed number of sequence slots) and,
    with ``leak=True``, never frees a slot on close."""

    def __init__(self, limit: int = 8, *, leak: bool = False) -> None:
        super().__init__()
        self.limit = limit
        self.leak = leak
        self._used = 0

    def _slot(self) -> None:
        if self._used >= self.limit:
            raise CapacityError(f"{self.name}: all {self.limit} sequence slots are in use")
        self._used += 1

    def open(self, tokens: Sequence[int]) -> Handle:
        self._slot()
        return self.inner.open(tokens)

    def fork(self, handle: Handle, length: int) -> Handle:
        self.inner.tokens(handle)
        self._slot()
        return self.inner.fork(handle, length)

    def close(self, handle: Handle) -> None:
        self.inner.close(handle)
        if not self.leak:
            self._used -= 1


class SwapsPairs(Wrapper):
    """A batch of exactly two requests comes back with the second request's rows first
    (a reversed gather index that only the two-request kernel path uses)."""

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> Any:
        if len(requests) != 2:
            return self.inner.extend(requests)
        return self.inner.extend(list(reversed(list(requests))))


class KeepsWhatFits(Wrapper):
    """A refused extend is not atomic: the tokens that still fit are appended before
    the CapacityError is raised (a per-token loop that checks capacity as it goes)."""

    def __init__(self, context_size: int = 12) -> None:
        super().__init__(reference(order=3))
        self.context_size = context_size

    def open(self, tokens: Sequence[int]) -> Handle:
        if len(tokens) > self.context_size:
            raise CapacityError(f"{len(tokens)} tokens exceed context {self.context_size}")
        return self.inner.open(tokens)

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> Any:
        for handle, toks in requests:
            room = self.context_size - len(self.inner.tokens(handle))
            if len(toks) > room:
                if room > 0:
                    self.inner.extend([(handle, list(toks)[:room])])
                raise CapacityError(f"handle {handle!r} is full ({self.context_size} tokens)")
        return self.inner.extend(requests)


class StaleAfterRefusal(Wrapper):
    """The tokens of a refused extend stay in the engine's batch buffer and are decoded
    in front of that handle's next extend (a batch not cleared after a failed decode)."""

    def __init__(self, context_size: int = 12) -> None:
        super().__init__(reference(order=3))
        self.context_size = context_size
        self._stale: dict[Handle, list[int]] = {}

    def open(self, tokens: Sequence[int]) -> Handle:
        if len(tokens) > self.context_size:
            raise CapacityError(f"{len(tokens)} tokens exceed context {self.context_size}")
        return self.inner.open(tokens)

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> Any:
        for handle, toks in requests:
            if len(self.inner.tokens(handle)) + len(toks) > self.context_size:
                self._stale[handle] = list(toks)
                raise CapacityError(f"handle {handle!r} is full ({self.context_size} tokens)")
        rows = []
        for handle, toks in requests:
            stale = self._stale.pop(handle, [])
            out = self.inner.extend([(handle, stale + list(toks))])
            rows.append(out[len(stale) :])
        return np.concatenate(rows)


class DeclaresTooMuch(Wrapper):
    """``context_size`` says 12 but the engine holds 11 tokens (a slot kept for BOS, or
    ``n_ctx`` counted from 1)."""

    def __init__(self) -> None:
        super().__init__(reference(order=3, context_size=11))
        self.context_size = 12


class BakedTemperature(Wrapper):
    """Every row is divided by 0.7: a sampling temperature baked into the backend. The
    model agrees with itself everywhere, so only a reference scorer can see it."""

    temperature = 0.7

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> Any:
        return self.inner.extend(requests) / self.temperature


class HangsOnBatches(Wrapper):
    """``extend`` of two or more requests never returns (until ``release`` is set): a
    deadlock in the engine's batching path."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__()
        self.release = release

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> Any:
        if len(requests) >= 2:
            self.release.wait()
        return self.inner.extend(requests)


def reference_scorer(context: Sequence[int]) -> np.ndarray:
    """The exact logits of :func:`reference` (what every ``Wrapper`` wraps), as a
    reference scorer for the suite's optional oracle check."""
    return _REFERENCE.logits(tuple(context))


_REFERENCE = reference()


Factory = Callable[[], Any]

#: name -> (factory, checks that must fail, text that the first failing message contains)
BROKEN: dict[str, tuple[Factory, tuple[str, ...], str]] = {
    "truncate_off_by_one": (TruncateOffByOne, ("truncate_reextend",), "one token too many"),
    "fork_aliasing": (ForkAliasing, ("fork_independence",), "shares state"),
    "stale_first_row": (StaleFirstRow, ("extend_vs_prefill",), "wrong position"),
    "rows_ahead": (RowsAhead, ("extend_vs_prefill",), "one position later"),
    "nondeterministic": (Noisy, ("determinism",), "differs from the first handle"),
    "batch_dependent": (
        BatchDependent,
        ("batched_vs_separate",),
        "depend on what else is in the batch",
    ),
    "close_is_noop": (CloseIsNoop, ("close",), "closed handle returned normally"),
    "clips_tokens": (ClipsTokens, ("invalid_tokens",), "InputError"),
    "returns_nan": (ReturnsNaN, ("no_nan_inf",), "NaN"),
    "wrong_width": (WrongWidth, ("shapes_dtypes",), "vocab_size columns"),
    "few_handles": (FewHandles, ("many_handles",), "only 8 handles could be open at once"),
    "leaky_close": (
        lambda: FewHandles(64, leak=True),
        ("close",),
        "close() does not release them",
    ),
    "swaps_pairs": (SwapsPairs, ("batched_vs_separate",), "rows in the wrong order"),
    "keeps_what_fits": (KeepsWhatFits, ("context_capacity",), "left tokens behind"),
    "declares_too_much": (
        DeclaresTooMuch,
        ("context_capacity",),
        "the model cannot hold the context_size it declares",
    ),
    "stale_after_refusal": (
        StaleAfterRefusal,
        ("context_capacity",),
        "differs from a fresh handle holding the same tokens",
    ),
}

#: Faults no self-comparison can see: caught only with a reference scorer
#: (name -> (factory, text the reference_logits message contains)).
NEEDS_REFERENCE: dict[str, tuple[Factory, str]] = {
    "baked_temperature": (BakedTemperature, "temperature of 0.7"),
}


def lossless_target() -> ReferenceModel:
    """A small target for the CLI's lossless half."""
    return ReferenceModel.random(vocab_size=24, order=2, seed=3, peakedness=2.0)


def lossless_draft() -> ReferenceModel:
    """Its draft: a perturbed copy (same vocabulary)."""
    return ReferenceModel.perturbed(lossless_target(), divergence=0.5, seed=4)
