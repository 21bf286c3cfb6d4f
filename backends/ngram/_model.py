"""A model-free n-gram / prompt-lookup draft: next-token counts from the handle's own history.

Theory of operation: for each handle we keep its tokens and an index mapping every
suffix key (a tuple of 1..``max_n`` tokens) that has occurred to the counts of the
tokens that followed it, plus unigram counts. The distribution after a history is
built from the *longest* suffix of the history (``max_n`` tokens down to 1) that
occurred before with a follower; if none did, from the unigram counts; if the history
is empty, uniform. Add-``alpha`` smoothing over the whole vocabulary keeps every token
possible, so ``p(t) = (count(t) + alpha) / (total + alpha * V)``, returned as log-probs.

Handles made by ``open`` keep an index updated incrementally on extend (``O(max_n)``
per token) and decremented on truncate. Handles made by ``fork`` (SSD's tree branches:
many, short-lived) keep no index: copying one costs ~3 ms at 1000 tokens, so they find
their suffix matches with a vectorised scan of the history instead (``O(len)`` numpy
per row, no set-up). Both give the same counts, hence bit-identical rows; the result
is a pure function of the token list.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ssd_core import ConfigError, Handle, LatencyModel, Tokenizer

from .._handles import HandleTable

__all__ = ["NgramModel"]

_Counts = dict[int, int]


class _Index:
    """Suffix-key -> follower counts for one token list."""

    __slots__ = ("followers", "max_n", "unigram")

    def __init__(self, max_n: int, vocab_size: int) -> None:
        self.max_n = max_n
        self.followers: dict[tuple[int, ...], _Counts] = {}
        self.unigram = np.zeros(vocab_size, dtype=np.int64)

    def add(self, tokens: Sequence[int], i: int) -> None:
        """Count ``tokens[i]`` as the follower of each suffix ending at ``i - 1``."""
        tok = tokens[i]
        self.unigram[tok] += 1
        for n in range(1, min(self.max_n, i) + 1):
            counts = self.followers.setdefault(tuple(tokens[i - n : i]), {})
            counts[tok] = counts.get(tok, 0) + 1

    def remove(self, tokens: Sequence[int], i: int) -> None:
        """Undo :meth:`add` for position ``i``."""
        tok = tokens[i]
        self.unigram[tok] -= 1
        for n in range(1, min(self.max_n, i) + 1):
            key = tuple(tokens[i - n : i])
            counts = self.followers[key]
            if counts[tok] == 1:
                del counts[tok]
                if not counts:
                    del self.followers[key]
            else:
                counts[tok] -= 1

    def lookup(self, tokens: Sequence[int]) -> tuple[int, _Counts | None]:
        """The longest suffix of ``tokens`` seen before: (its length, follower counts)."""
        for n in range(min(self.max_n, len(tokens)), 0, -1):
            counts = self.followers.get(tuple(tokens[-n:]))
            if counts:
                return n, counts
        return 0, None


def _scan(tokens: Sequence[int], max_n: int) -> tuple[int, np.ndarray, np.ndarray] | None:
    """The longest suffix of ``tokens`` (``max_n`` down to 1 tokens) that occurred before
    with a follower, found by scanning: (its length, follower ids, follower counts)."""
    arr = np.asarray(tokens, dtype=np.int64)
    length = len(arr)
    for n in range(min(max_n, length - 1), 0, -1):
        windows = length - n  # windows arr[s:s+n] for s < length - n have a follower
        mask = arr[0:windows] == arr[length - n]
        for i in range(1, n):
            mask &= arr[i : i + windows] == arr[length - n + i]
        followers = arr[n:length][mask]
        if followers.size:
            ids, counts = np.unique(followers, return_counts=True)
            return n, ids, counts
    return None


class NgramModel:
    """Prompt-lookup / n-gram draft model implementing :class:`ssd_core.Model`.

    Build it with the target's ``vocab_size``; it needs no weights and no engine.
    """

    tokenizer: Tokenizer | None = None

    def __init__(
        self,
        *,
        vocab_size: int,
        max_n: int = 3,
        alpha: float = 1e-8,
        escape: float = 3.0,
        context_size: int | None = None,
        name: str | None = None,
    ) -> None:
        """Make an n-gram draft.

        Args:
            vocab_size: number of logits per row (must equal the target's).
            max_n: the longest history suffix matched (tokens).
            alpha: add-alpha smoothing mass per token (> 0), so no token has
                probability 0. The vocabulary gets ``alpha * vocab_size`` pseudo-counts
                in all: at vocab 49152, ``alpha=0.01`` is 491 pseudo-counts, which
                swamps a history's few real counts, and a sampled draft token is then
                nearly uniform (measured acceptance at T = 1 on SmolLM2: 0.7 %, against
                11.2 % with the default 1e-8). Greedy drafting does not depend on alpha.
            escape: pseudo-counts of "a token never seen after this suffix" (spread
                over the vocabulary) for a match of one token; each token more of
                match divides it by 4 (3, 0.75, 0.19 for 1-, 2- and 3-token matches).
                A row's top probability then says how often its token is right:
                measured on SmolLM2's greedy output for the bundled prompts, a
                follower seen once was the next token 24 % of the time after a
                1-token match, 57 % after 2 and 84 % after 3 (the rows say 25 %, 57 %
                and 84 %), so the engine's speculation policy drafts where it pays and
                abstains elsewhere. 0: counts alone (a single sighting says 100 %).
            context_size: the most tokens one handle may hold (``None``: unbounded).
            name: the model's name in reports.

        Raises:
            ConfigError: a value is out of range.
        """
        if vocab_size < 1:
            raise ConfigError(f"ngram: vocab_size must be >= 1, got {vocab_size}")
        if max_n < 1:
            raise ConfigError(f"ngram: max_n must be >= 1, got {max_n}")
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ConfigError(f"ngram: alpha must be finite and > 0, got {alpha}")
        if not (escape >= 0 and math.isfinite(escape)):
            raise ConfigError(f"ngram: escape must be finite and >= 0, got {escape}")
        self.escape = float(escape)
        self.vocab_size = vocab_size
        self.max_n = max_n
        self.alpha = float(alpha)
        #: Declared costs for the core's speculation policy. A row is a count lookup and
        #: one log over the vocabulary (~0.03 ms at V = 49152), but what it costs a run
        #: is that plus the engine's own work on a row of V logits (finiteness, top
        #: candidates, confidence), all on the engine's thread: measured ~0.35 ms a
        #: row at V = 49152 (SSD vs AR with SmolLM2, 3 prompts, sequential driver).
        self.latency = LatencyModel(
            per_call=1e-5, per_token=7e-9 * vocab_size, prefill_per_token=1e-6
        )
        self.context_size = context_size
        self.name = name or f"ngram(max_n={max_n},alpha={alpha:g})"
        self._table = HandleTable(owner=self.name, vocab_size=vocab_size, context_size=context_size)
        self._index: dict[Handle, _Index | None] = {}  # None: a fork, scanned

    # -- the Model protocol ---------------------------------------------------------

    def open(self, tokens: Sequence[int]) -> Handle:
        """Make a handle holding ``tokens`` and index them.

        Raises:
            InputError: a token id outside the vocabulary.
            CapacityError: more than ``context_size`` tokens.
        """
        handle = self._table.open(tokens)
        toks = self._table.tokens(handle)
        index = _Index(self.max_n, self.vocab_size)
        for i in range(len(toks)):
            index.add(toks, i)
        self._index[handle] = index
        return handle

    def extend(self, requests: Sequence[tuple[Handle, Sequence[int]]]) -> np.ndarray:
        """Append tokens and return the n-gram log-probabilities after each one.

        Raises:
            HandleError: unknown or closed handle.
            InputError: bad token id, empty request, or a handle named twice.
            CapacityError: a handle would exceed ``context_size``.
        """
        news = self._table.check_extend(requests)
        out = np.empty((sum(len(n) for n in news), self.vocab_size), dtype=np.float64)
        row = 0
        for (handle, _), new in zip(requests, news, strict=True):
            toks = self._table.tokens(handle)
            index = self._index[handle]
            for t in new:
                toks.append(t)
                if index is None:
                    self._fill_scanned(out[row], toks)
                else:
                    index.add(toks, len(toks) - 1)
                    self._fill(out[row], toks, index)
                row += 1
        return out

    def fork(self, handle: Handle, length: int) -> Handle:
        """A new handle with the first ``length`` tokens of ``handle`` (no index: scanned).

        Raises:
            HandleError: unknown handle or ``length`` out of range.
        """
        child = self._table.fork(handle, length)
        self._index[child] = None
        return child

    def truncate(self, handle: Handle, length: int) -> None:
        """Keep the first ``length`` tokens, un-counting the dropped ones.

        Raises:
            HandleError: unknown handle or ``length`` out of range.
        """
        toks = self._table.check_length(handle, length)
        index = self._index[handle]
        if index is not None:
            for i in range(len(toks) - 1, length - 1, -1):
                index.remove(toks, i)
        self._table.truncate(handle, length)

    def close(self, handle: Handle) -> None:
        """Free ``handle``.

        Raises:
            HandleError: unknown or already closed handle.
        """
        self._table.close(handle)
        del self._index[handle]

    # -- distributions --------------------------------------------------------------

    def _fill(self, out: np.ndarray, toks: Sequence[int], index: _Index) -> None:
        n, counts = index.lookup(toks)
        if counts is not None:
            ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
            cnt = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
            self._fill_counts(out, n, ids, cnt)
        else:
            self._fill_unigram(out, index.unigram, len(toks))

    def _fill_scanned(self, out: np.ndarray, toks: Sequence[int]) -> None:
        found = _scan(toks, self.max_n)
        if found is not None:
            n, ids, cnt = found
            self._fill_counts(out, n, ids, cnt.astype(np.float64))
        else:
            uni = np.bincount(np.asarray(toks, dtype=np.int64), minlength=self.vocab_size)
            self._fill_unigram(out, uni, len(toks))

    def _fill_counts(self, out: np.ndarray, n: int, ids: np.ndarray, cnt: np.ndarray) -> None:
        """``p(t) = (count(t) + alpha + e / V) / (total + alpha V + e)``, ``e`` the
        escape mass of an ``n``-token match."""
        e = self.escape * 4.0 ** (1 - n)
        floor = self.alpha + e / self.vocab_size
        out.fill(math.log(floor))
        out[ids] = np.log(cnt + floor)
        out -= math.log(float(cnt.sum()) + self.alpha * self.vocab_size + e)

    def _fill_unigram(self, out: np.ndarray, unigram: np.ndarray, total: int) -> None:
        np.log(unigram + self.alpha, out=out)
        out -= math.log(total + self.alpha * self.vocab_size)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """The log-probabilities after ``tokens`` (a fresh computation, for tests).

        Raises:
            InputError: a token id outside the vocabulary.
        """
        toks = self._table.check_tokens(tokens)
        index = _Index(self.max_n, self.vocab_size)
        for i in range(len(toks)):
            index.add(toks, i)
        out = np.empty(self.vocab_size, dtype=np.float64)
        if not toks:
            out.fill(-math.log(self.vocab_size))
            return out
        self._fill(out, toks, index)
        return out

    def match_length(self, handle: Handle) -> int:
        """How many tokens of ``handle``'s suffix the last row was conditioned on (0: unigram)."""
        toks = self._table.tokens(handle)
        index = self._index[handle]
        if index is not None:
            return index.lookup(toks)[0]
        found = _scan(toks, self.max_n)
        return 0 if found is None else found[0]

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
            f"NgramModel(vocab_size={self.vocab_size}, max_n={self.max_n}, "
            f"alpha={self.alpha:g}, escape={self.escape:g})"
        )
