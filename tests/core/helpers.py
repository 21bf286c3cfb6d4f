"""Small test doubles for the core's tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from backends.reference import ReferenceModel


class Recording:
    """Wraps a model and records every call (to prove no call happened)."""

    def __init__(self, inner: ReferenceModel) -> None:
        self.inner = inner
        self.calls: list[str] = []
        self.name = inner.name
        self.vocab_size = inner.vocab_size
        self.context_size = inner.context_size
        self.tokenizer = None

    def open(self, tokens: Sequence[int]) -> Any:
        self.calls.append("open")
        return self.inner.open(tokens)

    def extend(self, requests: Any) -> Any:
        self.calls.append("extend")
        return self.inner.extend(requests)

    def fork(self, handle: Any, length: int) -> Any:
        self.calls.append("fork")
        return self.inner.fork(handle, length)

    def truncate(self, handle: Any, length: int) -> None:
        self.calls.append("truncate")
        self.inner.truncate(handle, length)

    def close(self, handle: Any) -> None:
        self.calls.append("close")
        self.inner.close(handle)


class Faulty(Recording):
    """Raises (or returns NaN) on the n-th extend call."""

    def __init__(self, inner: ReferenceModel, *, fail_at: int, nan: bool = False) -> None:
        super().__init__(inner)
        self.fail_at = fail_at
        self.nan = nan
        self.extends = 0

    def extend(self, requests: Any) -> Any:
        self.extends += 1
        out = super().extend(requests)
        if self.extends == self.fail_at:
            if self.nan:
                out = np.array(out)
                out[0, 0] = np.nan
                return out
            raise RuntimeError("device lost")
        return out


def pair(
    vocab: int = 16,
    order: int = 2,
    seed: int = 0,
    divergence: float = 0.5,
    peakedness: float = 2.0,
    **kw: Any,
) -> tuple[ReferenceModel, ReferenceModel]:
    target = ReferenceModel.random(
        vocab_size=vocab, order=order, seed=seed, peakedness=peakedness, **kw
    )
    draft = ReferenceModel.perturbed(target, divergence=divergence, seed=seed + 100)
    return target, draft
