"""Exact numpy models for tests, benchmarks and the conformance suite.

A reference model's next-token logits are a deterministic function of the last
``order`` tokens of the context (or of the whole context, for a wrapped callable).
Rows are generated on demand from the seed and the context, so a 150k vocabulary
never materialises a table; small vocabularies memoise rows.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

from ssd_core import ConfigError, Handle, LatencyModel

from .._handles import HandleTable

__all__ = ["ReferenceModel"]

LogitsFn = Callable[[tuple[int, ...]], np.ndarray]


def _context_seed(seed: int, salt: str, context: tuple[int, ...]) -> np.random.Generator:
    digest = hashlib.blake2b(
        np.asarray(context, dtype=np.int64).tobytes(),
        key=f"{salt}:{seed}".encode(),
        digest_size=16,
    ).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest, "little")))


class ReferenceModel:
    """An exact, stateless-per-context model implementing the Model protocol.

    Build one with :meth:`random`, :meth:`perturbed` or :meth:`from_callable`.
    """

    tokenizer = None

    def __init__(
        self,
        logits_fn: LogitsFn,
        *,
        vocab_size: int,
        order: int | None,
        name: str = "reference",
        context_size: int | None = None,
        latency: LatencyModel | None = None,
        sleep: bool = True,
        memoise: bool | None = None,
    ) -> None:
        if vocab_size < 1:
            raise ConfigError(f"vocab_size must be >= 1, got {vocab_size}")
        if order is not None and order < 1:
            raise ConfigError(f"order must be >= 1 (or None for the whole context), got {order}")
        self.name = name
        self.vocab_size = vocab_size
        self.order = order
        self.context_size = context_size
        #: The modelled cost of each call. The simulated driver charges it to its
        #: virtual clock; with ``sleep=True`` every call also sleeps that long
        #: (``time.sleep`` releases the GIL, so threaded runs overlap for real).
        self.latency = latency
        self.sleep = sleep
        self._raw_fn = logits_fn
        if memoise is None:
            memoise = order is not None and vocab_size <= 4096
        self._fn: LogitsFn = lru_cache(maxsize=1 << 16)(logits_fn) if memoise else logits_fn
        self._table = HandleTable(owner=name, vocab_size=vocab_size, context_size=context_size)

    # -- constructors -------------------------------------------------------------

    @classmethod
    def random(
        cls,
        *,
        vocab_size: int,
        order: int = 1,
        seed: int = 0,
        peakedness: float = 1.0,
        zero_fraction: float = 0.0,
        tie_levels: int | None = None,
        **kwargs: object,
    ) -> ReferenceModel:
        """A random n-gram model.

        Args:
            vocab_size: number of tokens.
            order: the distribution depends on the last ``order`` tokens.
            seed: the model is a pure function of its arguments.
            peakedness: scale of the Gaussian logits; 0 is uniform, 5 is very peaked.
            zero_fraction: share of tokens per context with probability exactly 0
                (logit ``-inf``); at least one token always keeps positive mass.
            tie_levels: if set, logits are rounded to this many levels, so that exact
                ties between tokens are common (greedy tie-breaking tests).
            **kwargs: passed to the constructor (``name``, ``context_size``, ``latency``).
        """
        if peakedness < 0 or not np.isfinite(peakedness):
            raise ConfigError(f"peakedness must be finite and >= 0, got {peakedness}")
        if not 0.0 <= zero_fraction < 1.0:
            raise ConfigError(f"zero_fraction must be in [0, 1), got {zero_fraction}")
        if tie_levels is not None and tie_levels < 1:
            raise ConfigError(f"tie_levels must be >= 1, got {tie_levels}")

        def logits(context: tuple[int, ...]) -> np.ndarray:
            rng = _context_seed(seed, "random", context)
            z = rng.standard_normal(vocab_size) * peakedness
            if tie_levels is not None:
                lo, hi = z.min(), z.max()
                span = (hi - lo) or 1.0
                z = np.round((z - lo) / span * (tie_levels - 1)) * (peakedness or 1.0)
            if zero_fraction > 0.0:
                n_zero = min(int(round(zero_fraction * vocab_size)), vocab_size - 1)
                if n_zero:
                    z[rng.permutation(vocab_size)[:n_zero]] = -np.inf
            return z

        return cls(logits, vocab_size=vocab_size, order=order, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def perturbed(
        cls, target: ReferenceModel, *, divergence: float = 0.5, seed: int = 1, **kwargs: object
    ) -> ReferenceModel:
        """A draft for ``target``: its logits plus Gaussian noise of scale ``divergence``.

        ``divergence=0`` gives an exact copy (acceptance 1); larger values lower the
        acceptance rate smoothly. Tokens impossible under the target stay impossible.
        """
        if divergence < 0 or not np.isfinite(divergence):
            raise ConfigError(f"divergence must be finite and >= 0, got {divergence}")
        base = target._raw_fn
        vocab = target.vocab_size

        def logits(context: tuple[int, ...]) -> np.ndarray:
            z = np.array(base(context), dtype=np.float64)
            if divergence:
                z = z + _context_seed(seed, "perturb", context).standard_normal(vocab) * divergence
            return z

        kwargs.setdefault("name", f"{target.name}-draft")
        return cls(logits, vocab_size=vocab, order=target.order, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_callable(
        cls,
        fn: Callable[[tuple[int, ...]], Sequence[float] | np.ndarray],
        *,
        vocab_size: int,
        order: int | None = None,
        **kwargs: object,
    ) -> ReferenceModel:
        """Wrap any Python callable ``context -> logits`` (``order=None``: whole context)."""

        def logits(context: tuple[int, ...]) -> np.ndarray:
            return np.asarray(fn(context), dtype=np.float64)

        return cls(logits, vocab_size=vocab_size, order=order, **kwargs)  # type: ignore[arg-type]

    # -- exact distributions (for tests) ------------------------------------------

    def _tail(self, context: Sequence[int]) -> tuple[int, ...]:
        ctx = tuple(int(t) for t in context)
        return ctx if self.order is None else ctx[-self.order :]

    def logits(self, context: Sequence[int]) -> np.ndarray:
        """The raw logits after ``context`` (a fresh float64 array)."""
        return np.array(self._fn(self._tail(context)), dtype=np.float64)

    def next_token_probs(self, context: Sequence[int]) -> np.ndarray:
        """The exact temperature-1 next-token distribution after ``context``."""
        z = self.logits(context)
        z = np.exp(z - z.max())
        return np.asarray(z / z.sum(), dtype=np.float64)

    # -- the Model protocol ---------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        if self.sleep and seconds > 0:
            time.sleep(seconds)

    def open(self, tokens: Sequence[int]) -> Handle:
        handle = self._table.open(tokens)
        if self.latency is not None:
            self._sleep(self.latency.open_cost(len(tokens)))
        return handle

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> np.ndarray:
        news = self._table.check_extend(requests)
        rows = []
        for (handle, _), new in zip(requests, news):
            toks = self._table.tokens(handle)
            for t in new:
                toks.append(t)
                rows.append(self._fn(self._tail(toks)))
        if self.latency is not None:
            self._sleep(self.latency.extend_cost(len(requests), len(rows)))
        return np.array(rows, dtype=np.float64).reshape(len(rows), self.vocab_size)

    def fork(self, handle: Handle, length: int) -> Handle:
        child = self._table.fork(handle, length)
        if self.latency is not None:
            self._sleep(self.latency.cache_op_cost())
        return child

    def truncate(self, handle: Handle, length: int) -> None:
        self._table.truncate(handle, length)

    def close(self, handle: Handle) -> None:
        self._table.close(handle)

    # -- introspection --------------------------------------------------------------

    @property
    def open_handles(self) -> int:
        """How many handles are open (tests use it to prove nothing leaks)."""
        return len(self._table)

    def tokens(self, handle: Handle) -> list[int]:
        """A copy of the tokens ``handle`` holds."""
        return list(self._table.tokens(handle))

    def __repr__(self) -> str:
        return (
            f"ReferenceModel(name={self.name!r}, vocab_size={self.vocab_size}, order={self.order})"
        )
