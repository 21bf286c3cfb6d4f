"""Core overhead per round: target-side math, draft-side math and bookkeeping.

Runs the real machine against a backend that costs (almost) nothing -- logits rows are
taken from a precomputed pool by hashing the context -- and times where the machine's
own time goes. Usage:

    python scripts/bench_core.py                      # the full grid
    python scripts/bench_core.py --quick              # B=1, K=4, V=50k only
    python scripts/bench_core.py --configs 1,4,24,50000 8,4,24,50000   # B,K,budget,V
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections import defaultdict

import attrs
import numpy as np

from backends._handles import HandleTable
from ssd_core import SamplingParams, SeededSource, SSDConfig, generate
from ssd_core.testing import (
    MathOps,
    accept_probabilities,
    check_logits,
    draft_weights,
    residual_weights,
    target_probs,
    using_ops,
)


class PoolModel:
    """Logits rows from a fixed random pool, chosen by a hash of the last two tokens."""

    tokenizer = None
    context_size = None

    def __init__(self, vocab: int, seed: int, pool: int = 64, noise: float = 0.0) -> None:
        rng = np.random.default_rng(0)
        self.pool = (rng.standard_normal((pool, vocab)) * 3).astype(np.float32)
        if noise:
            self.pool += (
                np.random.default_rng(seed).standard_normal((pool, vocab)) * noise
            ).astype(np.float32)
        self.name = f"pool{seed}"
        self.vocab_size = vocab
        self.t = HandleTable(owner=self.name, vocab_size=vocab, context_size=None)
        self.busy = 0.0

    def open(self, tokens):
        return self.t.open(tokens)

    def extend(self, requests):
        t0 = time.perf_counter()
        idx = []
        for h, toks in requests:
            held = self.t.tokens(h)
            for x in toks:
                held.append(int(x))
                idx.append((held[-1] * 31 + (held[-2] if len(held) > 1 else 0)) % len(self.pool))
        out = self.pool[idx]
        self.busy += time.perf_counter() - t0
        return out

    def fork(self, h, n):
        return self.t.fork(h, n)

    def truncate(self, h, n):
        self.t.truncate(h, n)

    def close(self, h):
        self.t.close(h)


def instrument():
    """Time the machine's math through the public seams: its MathOps and its random
    source (target side: processing, acceptance, residuals and their uniforms; draft
    side: proposal weights and their uniforms). The samplers themselves (inverse CDF,
    accept comparisons) run inside the jobs since the sync-free rounds and are counted
    in "book"; "core" is everything but the backend (wall clock); "cpu" is the process's
    CPU time per round, backend included (less sensitive to other load than wall)."""
    spent = defaultdict(float)

    def timed(fn, key):
        def wrapper(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent[key] += time.perf_counter() - t0

        return wrapper

    exact = MathOps()
    ops = attrs.evolve(
        exact,
        target_probs=timed(exact.target_probs, "target_math"),
        accept_probabilities=timed(exact.accept_probabilities, "target_math"),
        residual_weights=timed(exact.residual_weights, "target_math"),
        draft_weights=timed(exact.draft_weights, "draft_math"),
    )

    class TimedSource(SeededSource):
        # Only the uniforms are timed: overriding bernoulli/categorical would turn the
        # core's fast path (draws realised on the arrays' device) off.
        def uniforms(self, keys):
            side = "draft_math" if keys and keys[0][0] in ("tree", "neural") else "target_math"
            return timed(super().uniforms, side)(keys)

    return spent, ops, TimedSource


def run(b, k, budget, v, tokens):
    target = PoolModel(v, 1)
    draft = PoolModel(v, 2, noise=1.0)
    spent, ops, source = INSTRUMENTS
    spent.clear()
    t0, c0 = time.perf_counter(), time.process_time()
    with using_ops(ops):
        out = generate(
            target,
            draft,
            prompts=[[i + 1, i + 2] for i in range(b)],
            mode="ssd",
            max_new_tokens=tokens,
            sampling=SamplingParams(temperature=1.0),
            config=SSDConfig(k=k, fanout=budget, fallback="neural"),
            driver="sequential",
            source=source(0),
        )
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    rounds = out.metrics.rounds
    backend = target.busy + draft.busy
    other = wall - backend - spent["target_math"] - spent["draft_math"]
    return (
        rounds,
        spent["target_math"] / rounds,
        spent["draft_math"] / rounds,
        other / rounds,
        out.metrics,
        (wall - backend) / rounds,
        cpu / rounds,
    )


def tree_math_only(v=50_000, rows=168, reps=5):
    """The issue's figure: Saguaro draft weights + one categorical draw per row."""
    z = np.random.default_rng(0).standard_normal((rows, v)).astype(np.float32)
    src = SeededSource(0)
    keys = [("tree", i) for i in range(rows)]
    best = 1e9
    for _ in range(reps):
        t0 = time.perf_counter()
        zz = check_logits(z, rows, v, who="x", what="y")
        w = draft_weights(zz, [1.0] * rows, [3] * rows, 0.5)
        src.categorical(keys, w)
        best = min(best, time.perf_counter() - t0)
    return best


def verify_math_only(v=50_000, k=4, reps=20):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((k + 1, v)).astype(np.float32)
    q = np.exp(rng.standard_normal((k, v)))
    src = SeededSource(0)
    best = 1e9
    params = [SamplingParams(temperature=1.0)] * (k + 1)
    for _ in range(reps):
        t0 = time.perf_counter()
        zz = check_logits(z, k + 1, v, who="x", what="y")
        p = target_probs(zz, params)
        a = accept_probabilities(p[:k], q, [1, 2, 3, 4][:k])
        src.bernoulli([("a", i) for i in range(k)], a)
        r = residual_weights(p[1], q[1])
        src.categorical([("t",)], r[None, :])
        best = min(best, time.perf_counter() - t0)
    return best


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--configs", nargs="*", help="B,K,budget,V tuples (instead of the grid)")
    args = ap.parse_args()
    print(f"verification math, B=1 K=4 V=50k (5 rows): {verify_math_only() * 1e3:.2f} ms")
    print(f"draft-tree math, 24 x 7 = 168 rows, V=50k:  {tree_math_only() * 1e3:.1f} ms")
    INSTRUMENTS = instrument()
    grid = (
        [tuple(int(x) for x in c.split(",")) for c in args.configs]
        if args.configs
        else [(1, 4, 24, 50_000)]
        if args.quick
        else list(itertools.product((1, 8, 32), (4, 8), (10, 24), (1_000, 50_000, 150_000)))
    )
    print(
        f"{'B':>3} {'K':>2} {'budget':>6} {'V':>7} {'rounds':>6} {'target ms':>9} {'draft ms':>9} {'book ms':>8}"
        f" {'core ms':>8} {'cpu ms':>7} {'hit':>5}"
    )
    for b, k, budget, v in grid:
        rounds, tm, dm, other, m, core, cpu = run(b, k, budget, v, args.tokens)
        print(
            f"{b:3d} {k:2d} {budget:6d} {v:7d} {rounds:6d} {tm * 1e3:9.2f} {dm * 1e3:9.2f} {other * 1e3:8.2f}"
            f" {core * 1e3:8.2f} {cpu * 1e3:7.2f} {m.cache_hit_rate:5.0%}",
            flush=True,
        )
