"""Deliberately lossy variants of the machine, for negative controls only.

Each variant is built on the public seams of :mod:`ssd_core.testing` -- a
:class:`~ssd_core.testing.MathOps` (installed for a block with
:func:`~ssd_core.testing.using_ops`) or a random-source wrapper -- never by patching a
private module. Each reproduces a known trap (docs/exactness.md, section 4):

* ``argmax_accept_on_fast`` -- a point-mass (fast backup) proposal accepted iff it is
  the target's argmax (the reference engine's fast path at T > 0).
* ``unrescaled_q`` -- the draft samples from Saguaro-rescaled weights but the
  verifier uses the plain softmax q (ratio and residual).
* ``greedy_draft_softmax_q`` -- the draft takes the argmax but the verifier uses the
  softmax q it would have sampled from (a source wrapper).
* ``top_p_first_position_only`` -- the target's top-p is applied at the first
  verified position of each sequence only.
* ``cache_any_k`` -- a cache lookup ignores k: any cached branch whose token is t* is
  served (a speculation built for a different k, i.e. a different context).
* ``cache_any_sequence`` -- a cache lookup ignores which sequence built the branch.
* ``shared_accept_uniform`` -- all accept tests of a sequence's round compare their
  probabilities with one uniform (a source wrapper over the seeded source). Each test
  alone is still right; together they are correlated, which is lossy. The exact
  enumeration replaces the seeded source, so it cannot express this variant at all
  (the wrapper passes the enumerating source through unchanged): only tests that
  run the real source -- the draw-independence test and the Monte-Carlo G-tests --
  can catch it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import numpy as np

from ssd_core.testing import MathOps, to_numpy, using_ops

VARIANTS = (
    "argmax_accept_on_fast",
    "unrescaled_q",
    "greedy_draft_softmax_q",
    "top_p_first_position_only",
    "cache_any_k",
    "cache_any_sequence",
    "shared_accept_uniform",
)

EXACT = MathOps()


class GreedyDraftSource:
    """Wraps a source: draft and tree samples become the argmax (lowest id) of their
    weights; every other draw is passed through."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def bernoulli(self, keys: Any, probs: Any) -> list[bool]:
        return self.inner.bernoulli(keys, probs)

    def categorical(self, keys: Any, weights: Any) -> list[int]:
        if keys and keys[0][0] in ("tree", "neural"):
            w = to_numpy(weights)
            return [int(np.argmax(r)) for r in w]
        return self.inner.categorical(keys, weights)


class SharedAcceptUniform:
    """Wraps a seeded source: every accept test ``("accept", stream, round, i)`` uses
    the uniform of ``("accept", stream, round, 0)``. A source without uniforms (the
    enumerating one) is passed through unchanged."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._shared: dict[Any, float] = {}

    def _u(self, key: Any) -> float:
        group = tuple(key[:3])
        if group not in self._shared:
            self._shared[group] = self.inner.uniform(group + (0,))
        return self._shared[group]

    def bernoulli(self, keys: Any, probs: Any) -> list[bool]:
        if not hasattr(self.inner, "uniform"):
            return self.inner.bernoulli(keys, probs)
        out = []
        for k, p in zip(keys, probs, strict=True):
            u = self._u(k) if k[0] == "accept" else self.inner.uniform(k)
            out.append(u < p)
        return out

    def categorical(self, keys: Any, weights: Any) -> list[int]:
        return self.inner.categorical(keys, weights)


def lossy_ops(variant: str) -> MathOps | None:
    """The MathOps of ``variant``, or ``None`` when it is a source wrapper."""
    if variant == "argmax_accept_on_fast":

        def accept(p: Any, q: Any, tokens: Any) -> list[float]:
            qh = to_numpy(q)
            if np.all(np.sum(qh > 0, axis=1) == 1):  # a point-mass (fast backup) proposal
                ph = to_numpy(p)
                return [1.0 if int(np.argmax(ph[i])) == t else 0.0 for i, t in enumerate(tokens)]
            return EXACT.accept_probabilities(p, q, tokens)

        return attrs.evolve(EXACT, accept_probabilities=accept)

    if variant == "unrescaled_q":
        plain: dict[bytes, np.ndarray] = {}

        def dw(logits: Any, temps: Any, fans: Any, c: float) -> Any:
            w = EXACT.draft_weights(logits, temps, fans, c)
            w0 = EXACT.draft_weights(logits, temps, fans, 1.0)
            for a, b in zip(to_numpy(w), to_numpy(w0), strict=True):
                plain[np.ascontiguousarray(a).tobytes()] = b
            return w

        def swap(q: Any) -> Any:
            qh = np.atleast_2d(to_numpy(q))
            out = np.stack([plain.get(np.ascontiguousarray(r).tobytes(), r) for r in qh])
            return out if np.ndim(q) == 2 else out[0]

        return attrs.evolve(
            EXACT,
            draft_weights=dw,
            accept_probabilities=lambda p, q, t: EXACT.accept_probabilities(p, swap(q), t),
            residual_weights=lambda p, q: EXACT.residual_weights(p, swap(q)),
        )

    if variant == "top_p_first_position_only":

        def tp(rows: Any, params: Any, positions: Any) -> Any:
            full = EXACT.target_probs(rows, params, positions)
            loose = EXACT.target_probs(
                rows, [attrs.evolve(p, top_p=1.0) for p in params], positions
            )
            pick = np.array([pos == 0 for pos in positions])
            return np.where(pick[:, None], to_numpy(full), to_numpy(loose))

        return attrs.evolve(EXACT, target_probs=tp)

    if variant in ("cache_any_k", "cache_any_sequence"):
        any_k = variant == "cache_any_k"

        def lookup(branches: Any, sid: int, outcome: Any) -> Any:
            for b in branches:
                same_seq = b.sid == sid or not any_k
                same_k = b.k == outcome.accepted or any_k
                if same_seq and same_k and b.token == outcome.token and b.complete:
                    return b
            return None

        return attrs.evolve(EXACT, lookup=lookup)

    if variant in SOURCE_WRAPPERS:
        return None
    raise ValueError(variant)


@contextlib.contextmanager
def install(variant: str) -> Iterator[Callable[[Any], Any] | None]:
    """Install ``variant`` for the block; yields a source wrapper to pass along, or
    ``None``."""
    ops = lossy_ops(variant)
    if ops is None:
        yield SOURCE_WRAPPERS[variant]
        return
    with using_ops(ops):
        yield None


#: The variants that are source wrappers rather than MathOps.
SOURCE_WRAPPERS: dict[str, Callable[[Any], Any]] = {
    "greedy_draft_softmax_q": GreedyDraftSource,
    "shared_accept_uniform": SharedAcceptUniform,
}
