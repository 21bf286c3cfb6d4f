"""The per-row math: logit processing, draft proposals, verification, residuals.

Everything here is vectorised over rows and written against the Python array API
(through ``array-api-compat``), so it runs on whatever arrays the backend returns --
numpy for the reference and llama.cpp backends, torch tensors on the model's device for
the torch backend.

Host and device. On a GPU every value read back (``bool``, ``int``, ``float``,
``.tolist()``, a copy to the host) blocks the host until the device catches up. The
functions here never read a device value except :func:`to_host`, :func:`fetch` (several
small arrays in one transfer: a job calls it once per request it receives),
:func:`check_logits` and the single-row helpers :func:`top_ids` and :func:`count_above`
(kept for tests and host arrays; the jobs use the batched forms). Small host data (ids,
per-row parameters, uniforms) goes the other way through :func:`upload`, which does not
block the host; per-row parameters that are the same for every row stay Python scalars
and are not uploaded at all.

Dtypes (the policy, see docs/gpu.md): target probabilities ``p`` are float64 -- they
feed the acceptance test and the residual, few rows per round. Draft weights ``q'``
stay in the logits' dtype (float32 at least: bfloat16/float16 logits are upcast), since
a draft token is sampled from exactly those weights and verified against exactly those
weights, every sum over them (normalisation, the sampler's CDF) is taken in float64.
float64 logits give float64 everywhere, bit for bit as before.

Greedy (temperature 0) rows are one-hot at the *lowest* id among the maxima, in the
target and in the draft alike, so that greedy speculative decoding reproduces greedy
autoregressive decoding token for token.
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
    "check_shape",
    "count_above",
    "count_above_many",
    "draft_weights",
    "fetch",
    "finite_flag",
    "logits_error",
    "move_like",
    "namespace",
    "pick_top",
    "rank_from",
    "residual_weights",
    "target_probs",
    "to_host",
    "top_candidates",
    "top_ids",
    "upload",
]

Array = Any


def namespace(x: Array) -> Any:
    """The array-API namespace of ``x`` (numpy arrays get array-api-compat's wrapper)."""
    return compat.array_namespace(x)


def to_host(x: Array) -> np.ndarray:
    """A numpy copy of ``x`` (from any namespace and device). Blocks on a device."""
    if isinstance(x, np.ndarray):
        return x
    if compat.is_torch_array(x):
        return x.detach().to("cpu").numpy()
    return np.asarray(x)


def upload(values: np.ndarray, like: Array) -> Array:
    """Host data (a numpy array) in ``like``'s namespace and on its device, without
    blocking the host.

    numpy: the array itself. torch: a CPU tensor sharing ``values``' memory, on CUDA
    copied through pinned memory with ``non_blocking=True`` (the caching host allocator
    keeps the pinned block until the copy, queued on the current stream, is done), so
    the host never waits for the device. Other namespaces: ``asarray(..., device=)``.
    """
    if isinstance(like, np.ndarray):
        return values
    xp = namespace(like)
    if compat.is_torch_array(like):
        host = xp.asarray(values)  # on the host; no device named, so no copy yet
        dev = like.device
        if dev.type == "cpu":
            return host
        if dev.type == "cuda":
            return host.pin_memory().to(dev, non_blocking=True)
        return host.to(dev)
    return xp.asarray(values, device=compat.device(like))


def fetch(parts: Sequence[Array]) -> list[np.ndarray]:
    """Several small arrays on the host in one transfer (one host sync on a device).

    Device arrays are flattened, cast to float64 (ids below 2**53 and booleans survive
    exactly) and concatenated on their device, copied once, and split again; numpy
    arrays come back as they are. Each result has its part's shape.
    """
    out: list[np.ndarray | None] = [None] * len(parts)
    dev = [i for i, p in enumerate(parts) if not isinstance(p, np.ndarray)]
    for i, p in enumerate(parts):
        if isinstance(p, np.ndarray):
            out[i] = p
    if dev:
        xp = namespace(parts[dev[0]])
        flat = [xp.reshape(xp.astype(parts[i], xp.float64), (-1,)) for i in dev]
        host = to_host(xp.concat(flat) if len(flat) > 1 else flat[0])
        at = 0
        for i in dev:
            shape = tuple(parts[i].shape)
            size = math.prod(shape)
            out[i] = host[at : at + size].reshape(shape)
            at += size
    return [o for o in out if o is not None]


def move_like(x: Array, like: Array) -> Array:
    """``x`` converted into the namespace and onto the device of ``like``.

    torch to torch goes device to device (``.to(device)``, never through the host);
    numpy to a device is an :func:`upload` (it must cross from the host, but the host
    does not wait); anything else goes through a host copy.
    """
    if type(x) is type(like) and compat.device(x) == compat.device(like):
        return x
    if compat.is_torch_array(x) and compat.is_torch_array(like):
        dev = like.device
        # non_blocking only where the destination is a device: to the host it would
        # hand back memory the copy has not filled yet.
        return x.to(dev, non_blocking=dev.type != "cpu")
    if isinstance(x, np.ndarray):
        return upload(x, like)
    xp = namespace(like)
    return xp.asarray(to_host(x), device=compat.device(like))


def logits_error(who: str, what: str) -> BackendContractError:
    """The error for logits with NaN, +inf or an all -inf row."""
    return BackendContractError(f"backend {who!r} returned NaN, +inf or an all -inf row for {what}")


def check_shape(x: Array, rows: int, vocab_size: int, *, who: str, what: str) -> None:
    """Validate a backend's logits' shape and dtype (metadata only: no host sync).

    Raises:
        BackendContractError: wrong shape, or not a real floating dtype.
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


def finite_flag(x: Array) -> Array:
    """A 0-d boolean array, on ``x``'s device: every row's maximum is finite (no NaN, no
    +inf, no all -inf row). One pass over the rows; nothing is read back. ``x`` must
    have at least one row."""
    xp = namespace(x)
    # NaN propagates through max; +inf or an all -inf row shows in the row maximum.
    return xp.all(xp.isfinite(xp.max(x, axis=1)))


def check_logits(x: Array, rows: int, vocab_size: int, *, who: str, what: str) -> Array:
    """Validate a backend's logits (one pass: the row maxima) and return them as given.

    On a device this reads one flag back (a host sync); the jobs check the shape with
    :func:`check_shape` and bring :func:`finite_flag` back with their results instead.

    Raises:
        BackendContractError: wrong shape, NaN or +inf, or a row with no finite entry.
    """
    check_shape(x, rows, vocab_size, who=who, what=what)
    if rows and not bool(finite_flag(x)):
        raise logits_error(who, what)
    return x


def _onehot_argmax(xp: Any, z: Array, dtype: Any = None) -> Array:
    """One-hot rows at the lowest index of each row's maximum (float64 unless ``dtype``)."""
    idx = xp.argmax(z, axis=1)  # first occurrence of the maximum
    cols = xp.arange(z.shape[1], device=compat.device(z))
    return xp.astype(cols[None, :] == idx[:, None], xp.float64 if dtype is None else dtype)


def _column(xp: Any, x: Array, k: Array) -> Array:
    """``x[r, k[r]]`` for every row ``r``."""
    return xp.take_along_axis(x, xp.reshape(k, (-1, 1)), axis=1)[:, 0]


def _per_row(xp: Any, values: Sequence[Any], like: Array, dtype: Any) -> Any:
    """Per-row parameters that broadcast against ``like``'s ``[n, V]`` rows: a Python
    scalar when every row has the same value (nothing to upload), else an ``[n, 1]``
    array of ``dtype`` uploaded once."""
    first = values[0]
    if all(v == first for v in values):
        return first
    np_dtype = np.bool_ if dtype == xp.bool else (np.int64 if dtype == xp.int64 else np.float64)
    col = xp.reshape(upload(np.asarray(values, dtype=np_dtype), like), (-1, 1))
    return col if col.dtype == dtype else xp.astype(col, dtype)


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
        s = z.topk(max(ks), dim=1).values
    else:
        s = xp.sort(z, axis=1, descending=True)
    if all(k == ks[0] for k in ks):
        return s[:, ks[0] - 1]
    index = upload(np.asarray([k - 1 for k in ks], dtype=np.int64), z)
    return _column(xp, s, index)


def top_ids(z_row: Array, count: int, exclude: int | None = None) -> list[int]:
    """Ids of the ``count`` largest entries of one row, best first, ties to the lowest id.

    ``exclude`` (a rejected draft token, which can never be the recovery token) is
    skipped. Entries at ``-inf`` are never returned. On a device this reads a few
    candidates back (one host sync); the tree job uses :func:`top_candidates` for all
    its rows at once.
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
    v = z_row.shape[0]
    fetch_n = min(v, count + 1 + _TIE_SLACK)
    vals, ids = top_candidates(namespace(z_row).reshape(z_row, (1, v)), fetch_n)
    vals_h, ids_h = fetch([vals, ids])
    got = pick_top(vals_h[0], ids_h[0].astype(np.int64), count, exclude, fetch_n >= v)
    if got is not None:
        return got
    return top_ids(to_host(z_row), count, exclude)  # a tie wider than the fetch: rare


#: Extra candidates fetched beyond what is needed, so that ties at the boundary still
#: sort by id without another look at the row.
_TIE_SLACK = 8


def top_candidates(z: Array, n: int) -> tuple[Array, Array]:
    """The ``n`` largest entries of every row of ``z`` (values, ids), on ``z``'s device,
    in no particular order among ties: one ``topk`` for a whole block of rows. Read
    them back with :func:`fetch` and pick with :func:`pick_top` and :func:`rank_from`."""
    xp = namespace(z)
    if compat.is_torch_array(z):
        vals, ids = z.topk(n, dim=1)
        return vals, ids
    ids = xp.argsort(-z, axis=1, stable=True)[:, :n]
    return xp.take_along_axis(z, ids, axis=1), ids


def pick_top(
    vals: np.ndarray, ids: np.ndarray, count: int, exclude: int | None, complete: bool
) -> list[int] | None:
    """:func:`top_ids` of a row from its fetched top entries (host arrays).

    ``complete``: every entry of the row was fetched. Returns ``None`` when the fetch
    cannot decide: the last id needed ties with the smallest fetched value, so an
    unfetched entry with the same value and a lower id may come first.
    """
    keep = np.isfinite(vals)
    if exclude is not None:
        keep &= ids != exclude
    v, i = vals[keep], ids[keep]
    order = np.lexsort((i, -v))
    chosen = order[:count]
    if not complete and vals.size:
        floor = vals.min()
        if len(chosen) < count and floor > -np.inf:
            return None
        if len(chosen) and v[chosen[-1]] == floor:
            return None
    return [int(t) for t in i[chosen]]


def rank_from(
    vals: np.ndarray, ids: np.ndarray, token: int, exclude: int | None, complete: bool
) -> int | None:
    """:func:`count_above` for a row from its fetched top entries (host arrays), or
    ``None`` when they cannot decide (the token was not fetched, or ties with the
    smallest fetched value)."""
    at = np.flatnonzero(ids == token)
    if not at.size:
        return None
    vt = vals[at[0]]
    if not complete and vt == vals.min():
        return None
    above = (vals > vt) | ((vals == vt) & (ids < token))
    if exclude is not None:
        above &= ids != exclude
    return int(above.sum())


def count_above(z_row: Array, token: int, exclude: int | None = None) -> int:
    """How many entries outrank ``token`` in one row (larger value, or equal value and a
    lower id), ``exclude`` not counted. One scalar crosses to the host."""
    return count_above_many([z_row], [token], [exclude])[0]


def _above(z_row: Array, token: int, exclude: int | None) -> Array:
    xp = namespace(z_row)
    v = z_row.shape[0]
    cols = xp.arange(v, device=compat.device(z_row))
    zt = z_row[token]
    above = (z_row > zt) | ((z_row == zt) & (cols < token))
    if exclude is not None:
        above = above & (cols != exclude)
    return xp.sum(xp.astype(above, xp.int64))


def count_above_many(
    rows: Sequence[Array], tokens: Sequence[int], excludes: Sequence[int | None]
) -> list[int]:
    """:func:`count_above` for several rows (of one device) with one transfer."""
    if not rows:
        return []
    counts = [_above(r, t, e) for r, t, e in zip(rows, tokens, excludes)]
    if isinstance(rows[0], np.ndarray):
        return [int(c) for c in counts]
    (host,) = fetch([namespace(rows[0]).stack(counts)])
    return [int(c) for c in host]


def target_probs(logits: Array, params: Sequence[Any]) -> Array:
    """The processed target distribution for each row (float64, rows sum to 1).

    Processing, in order: temperature (0 means greedy: one-hot at the lowest argmax),
    top-k (keep every token whose logit is >= the k-th largest: ties are kept
    together), top-p (keep token t iff the mass of tokens strictly more probable than
    t is < top_p), min-p (keep t iff p_t >= min_p * max p). Each filter renormalises.
    Per-row parameters shared by every row are applied as scalars; others are uploaded
    once (no host sync either way).

    Args:
        logits: raw logits, one row per position (any real float dtype).
        params: one SamplingParams-like object per row (``temperature``, ``top_k``,
            ``top_p``, ``min_p``).
    """
    xp = namespace(logits)
    n, v = logits.shape
    temps = [float(p.temperature) for p in params]
    greedy = [t == 0.0 for t in temps]
    if all(greedy):
        return _onehot_argmax(xp, logits)
    t_rows = [t if t > 0 else 1.0 for t in temps]
    top_k = [int(p.top_k) if int(p.top_k) > 0 else v for p in params]
    if isinstance(logits, np.ndarray):
        # The same operations in place: one float64 copy of the rows instead of five.
        z = logits.astype(np.float64)
        z /= np.asarray(t_rows)[:, None]
        if any(k < v for k in top_k):
            kth = _kth_largest(xp, z, [min(k, v) for k in top_k])
            z[z < np.asarray(kth)[:, None]] = -math.inf
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        p = xp.asarray(z)
    else:
        z = xp.astype(logits, xp.float64)
        t = _per_row(xp, t_rows, z, xp.float64)
        if not (isinstance(t, float) and t == 1.0):  # x / 1.0 == x: skip the pass
            z = z / t
        if any(k < v for k in top_k):
            kth = _kth_largest(xp, z, [min(k, v) for k in top_k])
            z = xp.where(z >= kth[:, None], z, xp.full_like(z, -math.inf))
        z = z - xp.max(z, axis=1, keepdims=True)
        w = xp.exp(z)
        p = w / xp.sum(w, axis=1, keepdims=True)

    top_p = [float(q.top_p) for q in params]
    if any(tp < 1.0 for tp in top_p):
        s = xp.sort(p, axis=1, descending=True)
        before = xp.cumulative_sum(s, axis=1) - s  # mass strictly before each sorted slot
        tp = _per_row(xp, top_p, p, xp.float64)
        kept = xp.sum(xp.astype(before < tp, xp.int64), axis=1)
        cut = _column(xp, s, kept - 1)
        keep = p >= cut[:, None]
        if not isinstance(tp, float):  # rows without top-p keep everything
            keep = keep | (tp >= 1.0)
        p = xp.where(keep, p, xp.zeros_like(p))
        p = p / xp.sum(p, axis=1, keepdims=True)

    min_p = [float(q.min_p) for q in params]
    if any(mp > 0.0 for mp in min_p):
        mp = _per_row(xp, min_p, p, xp.float64)
        floor = mp * xp.max(p, axis=1, keepdims=True)
        p = xp.where(p >= floor, p, xp.zeros_like(p))
        p = p / xp.sum(p, axis=1, keepdims=True)

    if any(greedy):
        g = _per_row(xp, greedy, p, xp.bool)
        p = xp.where(g, _onehot_argmax(xp, logits), p)
    return p


def _draft_dtype(xp: Any, logits: Array) -> Any:
    """The dtype draft weights are computed in: the logits' own, at least float32."""
    return logits.dtype if logits.dtype in (xp.float32, xp.float64) else xp.float32


def draft_weights(
    logits: Array, temperatures: Sequence[float], fanouts: Sequence[int], saguaro_c: float
) -> Array:
    """Unnormalised draft proposal weights q' for each row (any positive per-row scale).

    Temperature 0 gives a one-hot row. Otherwise ``w_t = exp(z_t / T)`` and, under
    Saguaro sampling with ``saguaro_c < 1``, the tokens whose logit is >= the
    ``fanouts[r]``-th largest of row ``r`` are down-weighted by ``saguaro_c`` (rows with
    fan-out 0 are left alone). A token is sampled from these weights *and* verified
    against them, which is what keeps Saguaro sampling lossless -- in any precision:
    the weights are computed in the logits' dtype (float32 at least), and every sum
    over them (the sampler's CDF, the verifier's normalisation) is taken in float64.
    """
    xp = namespace(logits)
    greedy = [t == 0.0 for t in temperatures]
    if all(greedy):
        return _onehot_argmax(xp, logits)
    if isinstance(logits, np.ndarray) and not any(greedy):
        return _draft_weights_numpy(logits, temperatures, fanouts, saguaro_c)
    dtype = _draft_dtype(xp, logits)
    z = logits if logits.dtype == dtype else xp.astype(logits, dtype)
    t = _per_row(xp, [t if t > 0 else 1.0 for t in temperatures], z, dtype)
    if not (isinstance(t, float) and t == 1.0):
        z = z / t
    z = z - xp.max(z, axis=1, keepdims=True)
    w = xp.exp(z)
    rows = [r for r, f in enumerate(fanouts) if f > 0 and not greedy[r]]
    if saguaro_c < 1.0 and rows:
        ks = [max(int(f), 1) for f in fanouts]
        kth = _kth_largest(xp, logits, ks)
        down = logits >= kth[:, None]
        active = _per_row(xp, [f > 0 for f in fanouts], w, xp.bool)
        if not isinstance(active, bool):
            down = down & active
        w = xp.where(down, w * saguaro_c, w)
        w = w / xp.max(w, axis=1, keepdims=True)
    if any(greedy):
        g = _per_row(xp, greedy, w, xp.bool)
        w = xp.where(g, _onehot_argmax(xp, logits, w.dtype), w)
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


def accept_probabilities(p: Array, q: Array, tokens: Sequence[int] | Array) -> Array:
    """``min(1, p_i(d_i) / q_i(d_i))`` for each row ``i``: a float64 array in ``p``'s
    namespace and on its device (nothing is read back).

    Row-wise: the rows of several speculations may be stacked and verified in one call.

    Args:
        p: processed target probabilities (float64), one row per drafted token.
        q: the proposal's weights (unnormalised, any float dtype) in the same namespace
            and on the same device; normalised here with a float64 sum.
        tokens: the drafted tokens ``d_i`` (ints, or an integer array on ``p``'s device).
    """
    xp = namespace(p)
    if not hasattr(tokens, "shape"):  # host ints
        if not len(tokens):
            return xp.zeros((0,), dtype=xp.float64, device=compat.device(p))
        idx = upload(np.asarray(tokens, dtype=np.int64), p)
    else:
        idx = tokens
    p_d = _column(xp, p, idx)
    q_d = xp.astype(_column(xp, q, idx), xp.float64) / xp.sum(q, axis=1, dtype=xp.float64)
    # q_d > 0 for any token really drawn from q; guard the division all the same.
    ratio = p_d / xp.where(q_d > 0, q_d, xp.ones_like(q_d))
    return xp.where(ratio < 1.0, ratio, xp.ones_like(ratio))


def residual_weights(p: Array, q: Array) -> Array:
    """``max(0, p - q)`` for rejected positions (unnormalised, float64): one row, or
    rows (the last axis is the vocabulary).

    A row whose residual has (numerically) no mass gets ``p`` itself: the rejection had
    vanishing probability and ``p`` is the right limit. Decided on the device: nothing
    is read back.
    """
    if isinstance(p, np.ndarray):
        # In place on one float64 copy (p + (-(q / s)) is p - q / s exactly).
        r = np.asarray(q, dtype=np.float64).copy()
        r /= -r.sum(axis=-1, keepdims=True)
        r += p
        np.maximum(r, 0.0, out=r)
        empty = r.sum(axis=-1, keepdims=True) <= 1e-12
        return np.where(empty, p, r) if empty.any() else r
    xp = namespace(p)
    qq = xp.astype(q, xp.float64)
    qq = qq / xp.sum(qq, axis=-1, keepdims=True)
    r = xp.maximum(p - qq, xp.zeros_like(p))
    mass = xp.sum(r, axis=-1, keepdims=True)
    return xp.where(mass > 1e-12, r, p)
