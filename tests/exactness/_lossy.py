"""Deliberately lossy variants of the machine, for negative controls only.

Each variant is installed with pytest's ``monkeypatch`` on names that
``ssd_core._machine`` looks up at call time (no seam was added to the core), or is a
random-source wrapper. Each reproduces a trap from DESIGN.md section 3:

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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import numpy as np
import pytest

import ssd_core._jobs as M
from ssd_core._math import to_host

VARIANTS = (
    "argmax_accept_on_fast",
    "unrescaled_q",
    "greedy_draft_softmax_q",
    "top_p_first_position_only",
    "cache_any_k",
    "cache_any_sequence",
)


class GreedyDraftSource:
    """Wraps a source: draft and tree samples become the argmax (lowest id) of their
    weights; every other draw is passed through."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def bernoulli(self, keys: Any, probs: Any) -> list[bool]:
        return self.inner.bernoulli(keys, probs)

    def categorical(self, keys: Any, weights: Any) -> list[int]:
        if keys and keys[0][0] in ("tree", "neural"):
            w = to_host(weights)
            return [int(np.argmax(r)) for r in w]
        return self.inner.categorical(keys, weights)


def install(variant: str, monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], Any] | None:
    """Install ``variant``; returns a source wrapper to pass along, or ``None``."""
    if variant == "argmax_accept_on_fast":
        orig = M.accept_probabilities

        def accept(p: Any, q: Any, tokens: Any) -> list[float]:
            qh = to_host(q)
            if np.all(np.sum(qh > 0, axis=1) == 1):  # a point-mass (fast backup) proposal
                ph = to_host(p)
                return [1.0 if int(np.argmax(ph[i])) == t else 0.0 for i, t in enumerate(tokens)]
            return orig(p, q, tokens)

        monkeypatch.setattr(M, "accept_probabilities", accept)
        return None

    if variant == "unrescaled_q":
        plain: dict[bytes, np.ndarray] = {}
        orig_dw, orig_acc, orig_res = M.draft_weights, M.accept_probabilities, M.residual_weights

        def dw(logits: Any, temps: Any, fans: Any, c: float) -> Any:
            w = orig_dw(logits, temps, fans, c)
            w0 = orig_dw(logits, temps, fans, 1.0)
            for a, b in zip(to_host(w), to_host(w0), strict=True):
                plain[np.ascontiguousarray(a).tobytes()] = b
            return w

        def swap(q: Any) -> Any:
            qh = np.atleast_2d(to_host(q))
            out = np.stack([plain.get(np.ascontiguousarray(r).tobytes(), r) for r in qh])
            return out if np.ndim(q) == 2 else out[0]

        monkeypatch.setattr(M, "draft_weights", dw)
        monkeypatch.setattr(M, "accept_probabilities", lambda p, q, t: orig_acc(p, swap(q), t))
        monkeypatch.setattr(M, "residual_weights", lambda p, q: orig_res(p, swap(q)))
        return None

    if variant == "greedy_draft_softmax_q":
        return GreedyDraftSource

    if variant == "top_p_first_position_only":
        first: list[set[int]] = [set()]
        orig_recv = M._VerifyJob.receive
        orig_tp = M.target_probs

        def receive(self: Any, request: Any, result: Any) -> None:
            starts, at = set(), 0
            for s in self.seqs:
                starts.add(at)
                at += len(s.spec.tokens) + 1
            first[0] = starts
            orig_recv(self, request, result)

        def tp(rows: Any, params: Any) -> Any:
            full = orig_tp(rows, params)
            loose = orig_tp(rows, [attrs.evolve(p, top_p=1.0) for p in params])
            pick = np.array([i in first[0] for i in range(len(params))])
            return np.where(pick[:, None], to_host(full), to_host(loose))

        monkeypatch.setattr(M._VerifyJob, "receive", receive)
        monkeypatch.setattr(M, "target_probs", tp)
        return None

    if variant in ("cache_any_k", "cache_any_sequence"):
        any_k = variant == "cache_any_k"

        def lookup(self: Any, seq: Any, outcome: Any) -> Any:
            for b in self.branches:
                same_seq = b.seq is seq or not any_k
                same_k = b.k == outcome.accepted or any_k
                if same_seq and same_k and b.token == outcome.token and len(b.tokens) == self.m.k:
                    return b
            return None

        monkeypatch.setattr(M._TreeJob, "lookup", lookup)
        return None

    raise ValueError(variant)
