"""The per-row math: logit processing, draft proposals, verification, residuals.

Everything here is vectorised over rows and written against the Python array API
(through ``array-api-compat``), so it runs on whatever arrays the backend returns --
numpy for the reference and llama.cpp backends, torch tensors on the model's device for
the torch backend. Only sampled ids and a few scalars cross to the host.

All probabilities are float64. Greedy (temperature 0) rows are one-hot at the *lowest*
id among the maxima, in the target and in the draft alike, so that greedy speculative
decoding reproduces greedy autoregressive decoding token for token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import array_api_compat as compat
import numpy as np

from ._errors import BackendContractError

__all__ = [
    "accept_probabilities",
    "check_logits",
    "count_above",
    "draft_weights",
    "namespace",
    "residual_weights",
    "target_probs",
    "to_host",
    "top_ids",
]

Array = Any


def namespace(x: Array) -> Any:
    """The array-API namespace of ``x`` (numpy arrays get array-api-compat's wrapper)."""
    return compat.array_namespace(x)


def to_host(x: Array) -> np.ndarray:
    """A numpy copy of ``x`` (from any namespace and device)."""
    if isinstance(x, np.ndarray):
        return x
    if compat.is_torch_array(x):
        return x.detach().to("cpu").numpy()
    return np.asarray(x)


def move_like(x: Array, like: Array) -> Array:
    """``x`` converted into the namespace and onto the device of ``like``."""
    if type(x) is type(like) and compat.device(x) == compat.device(like):
        return x
    xp = namespace(like)
    return xp.asarray(to_host(x), device=compat.device(like))


def check_logits(x: Array, rows: int, vocab_size: int, *, who: str, what: str) -> Array:
    """Validate a backend's logits (one pass: the row maxima) and return them as given.

    Raises:
        BackendContractError: wrong shape, NaN or +inf, or a row with no finite entry.
    """
    shape = tuple(getattr(x, "shape", ()))
    if shape != (rows, vocab_size):
        raise BackendContractError(
            f"backend {who!r} returned logits of shape {shape} for {what}; "
            f"expected ({rows}, {vocab_size})"
        )
    xp = namespace(x)
    if not xp.isdtype(x.dtype, "real floating"):
        raise BackendContractError(
            f"backend {who!r} returned logits of dtype {x.dtype} for {what}; expected a real float"
        )
    # NaN propagates through max; +inf or an all -inf row shows in the row maximum.
    if rows and not bool(xp.all(xp.isfinite(xp.max(x, axis=1)))):
        raise BackendContractError(
            f"backend {who!r} returned NaN, +inf or an all -inf row for {what}"
        )
    return x


def _onehot_argmax(xp: Any, z: Array) -> Array:
    """One-hot rows at the lowest index of each row's maximum."""
    idx = xp.argmax(z, axis=1)  # first occurrence of the maximum
    cols = xp.arange(z.shape[1], device=compat.device(z))
    return xp.astype(cols[None, :] == idx[:, None], xp.float64)


def _column(xp: Any, x: Array, k: Array) -> Array:
    """``x[r, k[r]]`` for every row ``r``."""
    return xp.take_along_axis(x, xp.reshape(k, (-1, 1)), axis=1)[:, 0]


def _kth_largest(xp: Any, z: Array, ks: Sequence[int]) -> Array:
    """The ``ks[r]``-th largest value of row ``r`` (``ks[r] >= 1``; a ``k`` beyond the
    row's length means its smallest value: a fan-out may exceed the vocabulary)."""
    n, v = z.shape
    ks = [min(k, v) for k in ks]
    if compat.is_numpy_namespace(xp):
        out = np.empty(n)
        zz = np.asarray(z)
        for k in sorted(set(ks)):
            rows = [r for r in range(n) if ks[r] == k]
            out[rows] = np.partition(zz[rows], v - k, axis=1)[:, v - k]
        return xp.asarray(out)
    if compat.is_torch_array(z):  # the tensor's own top-k: no engine import here
        top = z.topk(max(ks), dim=1).values
        return _column(xp, top, xp.asarray([k - 1 for k in ks], device=compat.device(z)))
    s = xp.sort(z, axis=1, descending=True)
    return _column(xp, s, xp.asarray([k - 1 for k in ks], device=compat.device(z)))


def top_ids(z_row: Array, count: int, exclude: int | None = None) -> list[int]:
    """Ids of the ``count`` largest entries of one row, best first, ties to the lowest id.

    ``exclude`` (a rejected draft token, which can never be the recovery token) is
    skipped. Entries at ``-inf`` are never returned.
    """
    if not isinstance(z_row, np.ndarray):
        return _top_ids_on_device(z_row, count, exclude)
    z = z_row.astype(np.float64, copy=True)
    if exclude is not None:
        z[exclude] = -np.inf
    count = min(count, int(np.isfinite(z).sum()))
    if count <= 0:
        return []
    if count < z.shape[0] // 4:
        part = np.argpartition(-z, count - 1)[:count]
        # The partition may split a tie group at the boundary: widen to all ties, then sort.
        kth = z[part].min()
        part = np.flatnonzero(z >= kth)
    else:
        part = np.arange(z.shape[0])
    order = np.lexsort((part, -z[part]))  # by value descending, then id ascending
    return [int(i) for i in part[order][:count]]


def _top_ids_on_device(z_row: Array, count: int, exclude: int | None) -> list[int]:
    """:func:`top_ids` for device arrays: only a few candidates cross to the host."""
    xp = namespace(z_row)
    v = z_row.shape[0]
    z = xp.astype(z_row, xp.float64)
    if exclude is not None:
        cols = xp.arange(v, device=compat.device(z))
        z = xp.where(cols == exclude, xp.full_like(z, -math.inf), z)
    fetch = min(v, count + 8)  # a few extra, so ties at the boundary sort by id
    if compat.is_torch_array(z):
        vals, ids = z.topk(fetch)
    else:
        ids = xp.argsort(-z, stable=True)[:fetch]
        vals = xp.take(z, ids)
    vals_h, ids_h = to_host(vals), to_host(ids)
    keep = np.isfinite(vals_h)
    vals_h, ids_h = vals_h[keep], ids_h[keep]
    order = np.lexsort((ids_h, -vals_h))
    return [int(i) for i in ids_h[order][:count]]


def count_above(z_row: Array, token: int, exclude: int | None = None) -> int:
    """How many entries outrank ``token`` in one row (larger value, or equal value and a
    lower id), ``exclude`` not counted. One scalar crosses to the host."""
    xp = namespace(z_row)
    v = z_row.shape[0]
    cols = xp.arange(v, device=compat.device(z_row))
    zt = z_row[token]
    above = (z_row > zt) | ((z_row == zt) & (cols < token))
    if exclude is not None:
        above = above & (cols != exclude)
    return int(xp.sum(xp.astype(above, xp.int64)))


def target_probs(logits: Array, params: Sequence[Any]) -> Array:
    """The processed target distribution for each row (float64, rows sum to 1).

    Processing, in order: temperature (0 means greedy: one-hot at the lowest argmax),
    top-k (keep every token whose logit is >= the k-th largest: ties are kept
    together), top-p (keep token t iff the mass of tokens strictly more probable than
    t is < top_p), min-p (keep t iff p_t >= min_p * max p). Each filter renormalises.

    Args:
        logits: float64 raw logits, one row per position.
        params: one SamplingParams-like object per row (``temperature``, ``top_k``,
            ``top_p``, ``min_p``).
    """
    xp = namespace(logits)
    dev = compat.device(logits)
    n, v = logits.shape
    temps = [float(p.temperature) for p in params]
    greedy = [t == 0.0 for t in temps]
    if all(greedy):
        return _onehot_argmax(xp, logits)
    t_arr = xp.asarray([t if t > 0 else 1.0 for t in temps], dtype=xp.float64, device=dev)
    top_k = [int(p.top_k) if int(p.top_k) > 0 else v for p in params]
    if isinstance(logits, np.ndarray):
        # The same operations in place: one float64 copy of the rows instead of five.
        z = logits.astype(np.float64)
        z /= np.asarray(t_arr)[:, None]
        if any(k < v for k in top_k):
            kth = _kth_largest(xp, z, [min(k, v) for k in top_k])
            z[z < np.asarray(kth)[:, None]] = -math.inf
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        p = xp.asarray(z)
    else:
        z = xp.astype(logits, xp.float64) / t_arr[:, None]
        if any(k < v for k in top_k):
            kth = _kth_largest(xp, z, [min(k, v) for k in top_k])
            neg_inf = xp.asarray(-math.inf, dtype=xp.float64, device=dev)
            z = xp.where(z >= kth[:, None], z, neg_inf)
        z = z - xp.max(z, axis=1, keepdims=True)
        w = xp.exp(z)
        p = w / xp.sum(w, axis=1, keepdims=True)

    top_p = [float(q.top_p) for q in params]
    if any(tp < 1.0 for tp in top_p):
        s = xp.sort(p, axis=1, descending=True)
        before = xp.cumulative_sum(s, axis=1) - s  # mass strictly before each sorted slot
        tp_arr = xp.asarray(top_p, dtype=xp.float64, device=dev)
        kept = xp.sum(xp.astype(before < tp_arr[:, None], xp.int64), axis=1)
        cut = _column(xp, s, kept - 1)
        keep = (p >= cut[:, None]) | (tp_arr[:, None] >= 1.0)
        p = xp.where(keep, p, xp.zeros_like(p))
        p = p / xp.sum(p, axis=1, keepdims=True)

    min_p = [float(q.min_p) for q in params]
    if any(mp > 0.0 for mp in min_p):
        mp_arr = xp.asarray(min_p, dtype=xp.float64, device=dev)
        floor = mp_arr[:, None] * xp.max(p, axis=1, keepdims=True)
        p = xp.where(p >= floor, p, xp.zeros_like(p))
        p = p / xp.sum(p, axis=1, keepdims=True)

    if any(greedy):
        g = xp.asarray(greedy, device=dev)
        p = xp.where(g[:, None], _onehot_argmax(xp, logits), p)
    return p


def draft_weights(
    logits: Array, temperatures: Sequence[float], fanouts: Sequence[int], saguaro_c: float
) -> Array:
    """Unnormalised draft proposal weights q' for each row (any positive per-row scale).

    Temperature 0 gives a one-hot row. Otherwise ``w_t = exp(z_t / T)`` and, under
    Saguaro sampling with ``saguaro_c < 1``, the tokens whose logit is >= the
    ``fanouts[r]``-th largest of row ``r`` are down-weighted by ``saguaro_c`` (rows with
    fan-out 0 are left alone). A token is sampled from these weights *and* verified
    against them, which is what keeps Saguaro sampling lossless.
    """
    xp = namespace(logits)
    dev = compat.device(logits)
    greedy = [t == 0.0 for t in temperatures]
    if all(greedy):
        return _onehot_argmax(xp, logits)
    if isinstance(logits, np.ndarray) and not any(greedy):
        return _draft_weights_numpy(logits, temperatures, fanouts, saguaro_c)
    t_arr = xp.asarray([t if t > 0 else 1.0 for t in temperatures], dtype=xp.float64, device=dev)
    z = logits / t_arr[:, None]
    z = z - xp.max(z, axis=1, keepdims=True)
    w = xp.exp(z)
    rows = [r for r, f in enumerate(fanouts) if f > 0 and not greedy[r]]
    if saguaro_c < 1.0 and rows:
        ks = [max(int(f), 1) for f in fanouts]
        kth = _kth_largest(xp, logits, ks)
        active = xp.asarray([f > 0 for f in fanouts], device=dev)
        down = (logits >= kth[:, None]) & active[:, None]
        w = xp.where(down, w * saguaro_c, w)
        w = w / xp.max(w, axis=1, keepdims=True)
    if any(greedy):
        g = xp.asarray(greedy, device=dev)
        w = xp.where(g[:, None], _onehot_argmax(xp, logits), w)
    return w


def _draft_weights_numpy(
    z: np.ndarray, temperatures: Sequence[float], fanouts: Sequence[int], saguaro_c: float
) -> np.ndarray:
    """The same weights as the generic path (up to a per-row scale, which sampling and
    verification both ignore), in the logits' own precision and with as few passes as
    possible: the tree's many rows make this the core's hottest loop on CPUs."""
    inv_t = np.asarray([1.0 / t for t in temperatures], dtype=z.dtype)[:, None]
    top = z.max(axis=1, keepdims=True) * inv_t
    uniform_t = bool(np.all(inv_t == 1.0))
    # exp(z / T) needs no shift when every row's maximum is well inside exp's range.
    shift = not bool(np.all(np.abs(top) < 60.0))
    if uniform_t and not shift:
        w = np.exp(z)
    else:
        w = z * inv_t if not uniform_t else z.copy()
        if shift:
            w -= top
        np.exp(w, out=w)
    if saguaro_c < 1.0 and any(f > 0 for f in fanouts):
        c = w.dtype.type(saguaro_c)
        for r, f in enumerate(fanouts):
            if f > 0:
                row = z[r]
                np.multiply(w[r], c, out=w[r], where=row >= _kth_largest_row(row, int(f)))
    return np.asarray(w)


def _kth_largest_row(row: np.ndarray, k: int) -> float:
    """The k-th largest entry of a numpy row (its smallest when ``k`` exceeds its length);
    partitions only the near-top entries when there are enough of them."""
    k = min(k, row.shape[0])
    top = row.max()
    near = row
    for width in (0.5, 2.0, 8.0):
        cand = row[row >= top - width]
        if cand.shape[0] >= k:
            near = cand
            break
    return float(np.partition(near, near.shape[0] - k)[near.shape[0] - k])


def accept_probabilities(p: Array, q: Array, tokens: Sequence[int]) -> list[float]:
    """``min(1, p_i(d_i) / q_i(d_i))`` for each row ``i`` (host floats).

    Args:
        p: processed target probabilities, one row per drafted token.
        q: the proposal's weights (unnormalised) in the same namespace and device.
        tokens: the drafted tokens ``d_i``.
    """
    if not tokens:
        return []
    xp = namespace(p)
    idx = xp.asarray(list(tokens), dtype=xp.int64, device=compat.device(p))
    p_d = _column(xp, p, idx)
    q_d = _column(xp, q, idx) / xp.sum(q, axis=1)
    # q_d > 0 for any token really drawn from q; guard the division all the same.
    ratio = to_host(p_d / xp.where(q_d > 0, q_d, xp.ones_like(q_d)))
    return [min(1.0, float(r)) for r in ratio]


def residual_weights(p_row: Array, q_row: Array) -> Array:
    """``max(0, p - q)`` for one rejected position (unnormalised, float64).

    If the residual has (numerically) no mass, ``p`` itself is returned: the rejection
    had vanishing probability and ``p`` is the right limit.
    """
    xp = namespace(p_row)
    q = q_row / xp.sum(q_row)
    r = xp.maximum(p_row - q, xp.zeros_like(p_row))
    if float(xp.sum(r)) <= 1e-12:
        return p_row
    return r
