"""The random source: every random decision the core makes goes through here.

The core asks for *categorical* and *Bernoulli* draws, each named by a key that says
which purpose, sequence and round it serves: ``(purpose, stream, round, ...)``, e.g.
``("tree", stream, round, k, token, step)``. ``stream`` is the sequence's
:class:`Stream` -- its own seed and index, never the machine's bookkeeping -- and
``round`` counts that sequence's own verification rounds, so a request's draws depend
only on its prompt, parameters and seed, not on what else is in flight.

A :class:`SeededSource` realises each draw from a uniform derived from the seed and the
key alone -- so the same seed gives the same tokens whatever order the draws happen in
(threads, simulated clocks, a pruned tree), and on every array namespace. Another
source (the conformance package's enumerating source) can branch on every outcome
instead, because the draws are requested at this level rather than as raw uniforms.

Purposes: ``accept`` (position i of a verification), ``token`` (the recovery or bonus
token), ``neural`` (a just-in-time draft token), ``tree`` (a tree-decode token).

A fast path: a source that realises every draw from one uniform per key may say so by
offering ``uniforms(keys)`` (:class:`SeededSource` does). The core then realises the
draws itself, on the arrays' device -- a Bernoulli draw is ``u < p``, a categorical one
the inverse CDF at ``u`` -- so a whole job's accept tests and samples need one upload
of uniforms and one read of the outcomes instead of a host round trip per draw. The
tokens are the same either way. Sources without it (the enumerating source, wrappers
that change draws) get :meth:`RandomSource.bernoulli` and
:meth:`RandomSource.categorical` calls, as before.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

import array_api_compat as compat
import attrs
import numpy as np

from ._errors import InternalError
from ._math import namespace, to_host, upload

__all__ = [
    "Key",
    "RandomSource",
    "SeededSource",
    "Stream",
    "inverse_cdf",
    "sample_inverse_cdf",
    "uniform_draws",
]

#: Names one draw: ``(purpose, stream, round, ...)`` with ints and short strings after.
Key = tuple[Hashable, ...]


@attrs.frozen
class Stream:
    """A sequence's identity for random draws.

    ``seed`` seeds the sequence's draws under a :class:`SeededSource` (``None``: the
    source's own seed); ``index`` tells apart sequences that share a seed (the prompts
    of one :func:`~ssd_core.generate` call). Two sequences with the same stream and the
    same prompt and parameters get the same tokens.
    """

    seed: int | None
    index: int

    def __repr__(self) -> str:  # draw names print the index, as plain ints did
        return repr(self.index)


@runtime_checkable
class RandomSource(Protocol):
    """Where the core's randomness comes from.

    Must: return one outcome per key; outcomes with zero probability never occur.
    May: realise the draws any way it likes (seeded uniforms, enumeration, replay).
    May also offer ``uniforms(keys) -> list[float]`` (see the module docstring): then
    the core draws ``u < p`` and the inverse CDF at ``u`` itself and calls neither
    method below, so a source offering it must realise its draws exactly that way.
    """

    def bernoulli(self, keys: Sequence[Key], probs: Sequence[float]) -> list[bool]:
        """One draw per key: ``True`` with probability ``probs[i]``."""
        ...

    def categorical(self, keys: Sequence[Key], weights: Any) -> list[int]:
        """One draw per key from the rows of ``weights`` (non-negative, unnormalised,
        each row with positive sum; any array namespace and device)."""
        ...


def inverse_cdf(weights: Any, uniforms: Sequence[float] | Any) -> Any:
    """Row ``r``'s index by inverse CDF at ``uniforms[r]`` in ``[0, 1)``, as an int64
    array in the weights' namespace and on their device (nothing is read back).

    The CDF is accumulated in float64 whatever the weights' dtype, so token ``t`` is
    drawn with probability ``w_t / sum(w)`` up to float64 rounding. A zero-weight entry
    is never returned. ``uniforms`` may be host floats (uploaded without blocking) or
    a float64 array on the weights' device.
    """
    if isinstance(weights, np.ndarray):
        return np.asarray(_inverse_cdf_numpy(weights, list(uniforms)), dtype=np.int64)
    xp = namespace(weights)
    dev = compat.device(weights)
    n, v = weights.shape
    u: Any = uniforms
    if not hasattr(u, "shape"):
        u = upload(np.asarray(uniforms, dtype=np.float64), weights)
    cdf = xp.cumulative_sum(weights, axis=1, dtype=xp.float64)
    total = cdf[:, -1:]
    idx = xp.sum(xp.astype(cdf <= u[:, None] * total, xp.int64), axis=1)
    # u * total can round up to total; then fall back to the last positive entry.
    cols = xp.arange(v, device=dev)
    last_pos = xp.max(xp.where(weights > 0, cols[None, :], xp.zeros_like(cols)[None, :]), axis=1)
    return xp.minimum(idx, last_pos)


def sample_inverse_cdf(weights: Any, uniforms: Sequence[float]) -> list[int]:
    """Draw row ``r``'s index by inverse CDF at ``uniforms[r]`` in ``[0, 1)``.

    Runs in the weights' namespace and on their device; only the ids come back (one
    host sync on a device). A zero-weight entry is never returned.
    """
    if isinstance(weights, np.ndarray):
        return _inverse_cdf_numpy(weights, uniforms)
    return [int(i) for i in to_host(inverse_cdf(weights, uniforms))]


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


def _salt(seed: int) -> bytes:
    return struct.pack("<Q", seed)


class SeededSource:
    """Reproducible draws: a uniform per key from ``blake2b(seed, key)``.

    The seed is the key's :class:`Stream` seed when it has one, else this source's
    own. With ``check_unique`` every key is remembered and a repeated name raises
    :class:`~ssd_core.InternalError` (a debug mode the tests turn on: names are meant
    to be unique per run, which is what makes draws independent).
    """

    def __init__(self, seed: int = 0, *, check_unique: bool = False) -> None:
        from ._config import check_seed

        self.seed = check_seed(seed)
        self._salt = _salt(self.seed)
        self.check_unique = check_unique
        self._seen: set[Key] = set()

    def uniform(self, key: Key) -> float:
        """The uniform in ``[0, 1)`` this source assigns to ``key``."""
        salt = self._salt
        if len(key) > 1 and isinstance(key[1], Stream) and key[1].seed is not None:
            salt = _salt(key[1].seed)
        if self.check_unique:
            name = (
                key
                if len(key) < 2 or not isinstance(key[1], Stream)
                else (key[0], (key[1].seed, key[1].index), *key[2:])
            )
            if name in self._seen:
                raise InternalError(f"the draw {key!r} was named twice in one run")
            self._seen.add(name)
        digest = hashlib.blake2b(repr(key).encode(), key=salt, digest_size=8).digest()
        return (int.from_bytes(digest, "little") >> 11) * (1.0 / (1 << 53))

    def uniforms(self, keys: Sequence[Key]) -> list[float]:
        """The uniforms of ``keys``: the fast path (see the module docstring)."""
        return [self.uniform(k) for k in keys]

    def bernoulli(self, keys: Sequence[Key], probs: Sequence[float]) -> list[bool]:
        return [self.uniform(k) < p for k, p in zip(keys, probs)]

    def categorical(self, keys: Sequence[Key], weights: Any) -> list[int]:
        if not keys:
            return []
        return sample_inverse_cdf(weights, [self.uniform(k) for k in keys])

    def __repr__(self) -> str:
        return f"SeededSource(seed={self.seed})"


def uniform_draws(source: Any) -> Callable[[Sequence[Key]], list[float]] | None:
    """The source's ``uniforms`` when the core may realise its draws itself, else
    ``None``. A :class:`SeededSource` subclass that overrides ``bernoulli`` or
    ``categorical`` (and not ``uniforms``) changed how its draws are realised: it gets
    the protocol calls."""
    fn = getattr(source, "uniforms", None)
    if not callable(fn):
        return None
    if isinstance(source, SeededSource):
        cls = type(source)
        if cls.uniforms is SeededSource.uniforms and (
            cls.bernoulli is not SeededSource.bernoulli
            or cls.categorical is not SeededSource.categorical
        ):
            return None
    return fn  # type: ignore[no-any-return]


def host_rows(weights: Any) -> np.ndarray:
    """Normalised float64 numpy rows (for sources that enumerate outcomes)."""
    w = to_host(weights).astype(np.float64)
    return np.asarray(w / w.sum(axis=1, keepdims=True))
