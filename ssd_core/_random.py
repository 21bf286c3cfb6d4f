"""The random source: every random decision the core makes goes through here.

The core asks for *categorical* and *Bernoulli* draws, each named by a key that says
which sequence, round and purpose it serves (``("tree", seq, round, k, token, step)``).
A :class:`SeededSource` realises each draw from a uniform derived from the seed and the
key alone -- so the same seed gives the same tokens whatever order the draws happen in
(threads, simulated clocks, a pruned tree), and on every array namespace. Another
source (the conformance package's enumerating source) can branch on every outcome
instead, because the draws are requested at this level rather than as raw uniforms.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

import array_api_compat as compat
import numpy as np

from ._math import namespace, to_host

__all__ = ["Key", "RandomSource", "SeededSource", "sample_inverse_cdf"]

#: Names one draw. A tuple of ints and short strings.
Key = tuple[Hashable, ...]


@runtime_checkable
class RandomSource(Protocol):
    """Where the core's randomness comes from.

    Must: return one outcome per key; outcomes with zero probability never occur.
    May: realise the draws any way it likes (seeded uniforms, enumeration, replay).
    """

    def bernoulli(self, keys: Sequence[Key], probs: Sequence[float]) -> list[bool]:
        """One draw per key: ``True`` with probability ``probs[i]``."""
        ...

    def categorical(self, keys: Sequence[Key], weights: Any) -> list[int]:
        """One draw per key from the rows of ``weights`` (non-negative, unnormalised,
        each row with positive sum; any array namespace and device)."""
        ...


def sample_inverse_cdf(weights: Any, uniforms: Sequence[float]) -> list[int]:
    """Draw row ``r``'s index by inverse CDF at ``uniforms[r]`` in ``[0, 1)``.

    Runs in the weights' namespace and on their device; only the ids come back.
    A zero-weight entry is never returned.
    """
    if isinstance(weights, np.ndarray):
        return _inverse_cdf_numpy(weights, uniforms)
    xp = namespace(weights)
    dev = compat.device(weights)
    n, v = weights.shape
    cdf = xp.cumulative_sum(weights, axis=1)
    total = cdf[:, -1:]
    u = xp.asarray(list(uniforms), dtype=weights.dtype, device=dev)[:, None]
    idx = xp.sum(xp.astype(cdf <= u * total, xp.int64), axis=1)
    # u * total can round up to total; then fall back to the last positive entry.
    cols = xp.arange(v, device=dev)
    last_pos = xp.max(xp.where(weights > 0, cols[None, :], xp.zeros_like(cols)[None, :]), axis=1)
    idx = xp.minimum(idx, last_pos)
    return [int(i) for i in to_host(idx)]


_BLOCK = 512


def _inverse_cdf_numpy(weights: np.ndarray, uniforms: Sequence[float]) -> list[int]:
    """Two-level inverse CDF: float64 block sums, then a cumulative sum inside one block.

    About one pass over the weights instead of a full float64 cumulative sum per row;
    token ``t`` is drawn with probability ``w_t / sum(w)`` up to float64 rounding.
    """
    n, v = weights.shape
    full = v - v % _BLOCK
    parts = []
    if full:
        parts.append(
            weights[:, :full].reshape(n, full // _BLOCK, _BLOCK).sum(axis=2, dtype=np.float64)
        )
    if full < v:
        parts.append(weights[:, full:].sum(axis=1, dtype=np.float64)[:, None])
    cum = np.cumsum(np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0], axis=1)
    nblocks = cum.shape[1]
    out = []
    for r in range(n):
        total = cum[r, -1]
        x = uniforms[r] * total
        if x >= total:
            x = np.nextafter(total, 0.0)
        b = min(int(np.searchsorted(cum[r], x, side="right")), nblocks - 1)
        lo = b * _BLOCK
        inner = np.cumsum(weights[r, lo : lo + _BLOCK], dtype=np.float64)
        inner += cum[r, b - 1] if b else 0.0
        j = int(np.searchsorted(inner, x, side="right"))
        if j >= len(inner) or weights[r, lo + j] <= 0:
            # Only reachable through rounding at a block edge: the last positive entry
            # at or before the overshoot.
            pos = np.flatnonzero(weights[r, : lo + min(j, len(inner) - 1) + 1] > 0)
            out.append(int(pos[-1]))
        else:
            out.append(int(lo + j))
    return out


class SeededSource:
    """Reproducible draws: a uniform per key from ``blake2b(seed, key)``."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._salt = struct.pack("<q", self.seed & 0x7FFF_FFFF_FFFF_FFFF)

    def uniform(self, key: Key) -> float:
        """The uniform in ``[0, 1)`` this source assigns to ``key``."""
        digest = hashlib.blake2b(repr(key).encode(), key=self._salt, digest_size=8).digest()
        return (int.from_bytes(digest, "little") >> 11) * (1.0 / (1 << 53))

    def bernoulli(self, keys: Sequence[Key], probs: Sequence[float]) -> list[bool]:
        return [self.uniform(k) < p for k, p in zip(keys, probs)]

    def categorical(self, keys: Sequence[Key], weights: Any) -> list[int]:
        if not keys:
            return []
        return sample_inverse_cdf(weights, [self.uniform(k) for k in keys])

    def __repr__(self) -> str:
        return f"SeededSource(seed={self.seed})"


def host_rows(weights: Any) -> np.ndarray:
    """Normalised float64 numpy rows (for sources that enumerate outcomes)."""
    w = to_host(weights).astype(np.float64)
    return np.asarray(w / w.sum(axis=1, keepdims=True))
