"""Turning whatever a backend returns into numpy, and comparing logits.

The Model protocol lets a backend return any array-API array (numpy, torch on any
device). The suite does all its arithmetic in float64 numpy, so every array goes
through :func:`to_numpy` first; :func:`dtype_info` looks at the array *before*
conversion, so a backend returning integers or complex numbers is caught.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np

__all__ = ["DtypeInfo", "dtype_info", "max_abs_diff", "to_numpy"]


@attrs.frozen(kw_only=True)
class DtypeInfo:
    """What the suite needs to know about a returned array's element type.

    Attributes:
        name: the dtype as the array's library spells it (``"float32"``,
            ``"torch.bfloat16"``).
        real_float: whether it is a real floating-point type.
        bits: its width in bits (64, 32, 16), or 0 if unknown.
    """

    name: str
    real_float: bool
    bits: int


def dtype_info(x: Any) -> DtypeInfo:
    """Describe the element type of ``x`` (numpy array, torch tensor, anything array-like).

    Args:
        x: the array a backend returned.

    Returns:
        Its :class:`DtypeInfo`.
    """
    dtype = getattr(x, "dtype", None)
    if dtype is not None and hasattr(dtype, "is_floating_point"):  # torch.dtype
        real = bool(dtype.is_floating_point) and not bool(getattr(dtype, "is_complex", False))
        bits = int(getattr(dtype, "itemsize", 0)) * 8
        return DtypeInfo(name=str(dtype), real_float=real, bits=bits)
    try:
        np_dtype = np.dtype(dtype) if dtype is not None else np.asarray(x).dtype
    except TypeError:
        return DtypeInfo(name=str(dtype), real_float=False, bits=0)
    return DtypeInfo(
        name=str(np_dtype),
        real_float=bool(np.issubdtype(np_dtype, np.floating)),
        bits=np_dtype.itemsize * 8,
    )


def to_numpy(x: Any) -> np.ndarray:
    """Convert a backend's logits to a float64 numpy array on the host.

    Torch tensors are detached and moved to the CPU (bfloat16 is widened first, since
    numpy has no bfloat16); everything else goes through :func:`numpy.asarray`.

    Args:
        x: a numpy array, a torch tensor on any device, or anything array-like.

    Returns:
        A float64 numpy array with the same shape.

    Raises:
        TypeError: ``x`` cannot be converted to a real numeric array.
    """
    if hasattr(x, "detach"):
        t = x.detach()
        if "bfloat16" in str(getattr(t, "dtype", "")):
            t = t.float()
        x = t.cpu()
        if hasattr(x, "numpy"):
            x = x.numpy()
    arr = np.asarray(x)
    if np.iscomplexobj(arr):
        raise TypeError(f"complex logits ({arr.dtype}) cannot be compared as real numbers")
    return arr.astype(np.float64, copy=False)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """The largest absolute difference between two logits arrays.

    Entries that are equal count as 0 (so ``-inf`` against ``-inf`` is fine); ``-inf``
    against a finite value, NaN anywhere, or a shape mismatch count as ``inf``.

    Args:
        a: logits, any shape.
        b: logits of the same shape.

    Returns:
        ``max |a - b|`` over the entries that differ, 0.0 when they are all equal.
    """
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    differ = a != b
    if not differ.any():
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(a[differ] - b[differ])
    d = np.where(np.isnan(d), np.inf, d)
    return float(d.max())
