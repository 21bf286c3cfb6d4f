"""Host syncs per round made by the core (``ssd_core``) with tiny CPU torch models.

Counts, with ``backends.torch.count_host_syncs(simulate=True)``, every torch call that
would block the host on a GPU while ``generate(..., driver="sequential")`` runs (the
torch backend itself makes none, so every count is the core's). Usage:

    PYTHONPATH=. python scripts/core_syncs.py                 # AR/SD/SSD x B 1,4,8 x T 0,1
    PYTHONPATH=. python scripts/core_syncs.py --sites 8       # plus the top sites
    PYTHONPATH=. python scripts/core_syncs.py --json out.json
    PYTHONPATH=. python scripts/core_syncs.py --dtypes          # the dtype policy's cost

``--dtypes`` times the draft-side math on CPU torch (Saguaro weights and one inverse-CDF
draw per row, 168 rows x 50k, as scripts/bench_core.py's tree figure) with float32
weights (the policy) and with float64 weights (what float32 logits got before), and the
target side (float64 in both).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from backends.torch import TinyTransformer, TorchModel, count_host_syncs
from ssd_core import SamplingParams, SSDConfig, generate
from ssd_core.testing import (
    accept_probabilities,
    draft_weights,
    inverse_cdf,
    residual_weights,
    target_probs,
)

VOCAB = 96


def model(seed: int) -> TorchModel:
    return TorchModel.from_module(TinyTransformer(vocab_size=VOCAB, seed=seed, max_positions=256))


def count(target, draft, mode, batch, temperature, tokens=16, sites=False):
    prompts = [[3 + i, 17, 42, 5, 88][: 3 + i % 3] for i in range(batch)]
    with count_host_syncs(simulate=True, sites=sites) as syncs:
        res = generate(
            target,
            draft,
            prompts=prompts,
            mode=mode,
            max_new_tokens=tokens,
            sampling=SamplingParams(temperature=temperature),
            config=SSDConfig(k=4, fanout=8, fallback="neural"),
            driver="sequential",
            seed=0,
        )
    rounds = max(1, res.metrics.rounds)
    return syncs, rounds


def _best(fn, reps: int = 7) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def dtypes(threads: int) -> None:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    rows, v, k = 168, 50_000, 4
    z32 = torch.randn(rows, v, generator=g)
    u = torch.rand(rows, generator=g, dtype=torch.float64)

    def tree(z):
        w = draft_weights(z, [1.0] * rows, [3] * rows, 0.5)
        inverse_cdf(w, u)

    t32 = _best(lambda: tree(z32))
    t64 = _best(lambda: tree(z32.double()))  # includes the upcast, as the old path did
    print(f"tree math, {rows} x {v // 1000}k, torch CPU {threads} thread(s):")
    print(f"  float32 weights (policy) {t32:8.1f} ms   float64 weights {t64:8.1f} ms")
    zt = torch.randn(k + 1, v, generator=g)
    params = [SamplingParams(temperature=1.0, top_p=0.9)] * (k + 1)
    q32 = draft_weights(torch.randn(k, v, generator=g), [1.0] * k, [3] * k, 0.5)
    toks = [int(t) for t in torch.argmax(q32, dim=1)]

    def verify(q):
        p = target_probs(zt, params)
        accept_probabilities(p[:k], q, toks)
        inverse_cdf(residual_weights(p[1:2], q[1:2]), u[:1])

    print(f"verification math, K={k}, V={v // 1000}k (p float64 in both):")
    print(
        f"  q float32 (policy)       {_best(lambda: verify(q32)):8.2f} ms"
        f"   q float64 {_best(lambda: verify(q32.double())):8.2f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="ar,sd,ssd")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--temps", default="0,1")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--sites", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--dtypes", action="store_true", help="time the dtype policy instead")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.dtypes:
        dtypes(args.threads)
        return
    torch.set_num_threads(1)
    target, draft = model(0), model(1)
    out = []
    print(f"{'mode':>4} {'B':>2} {'T':>3} {'rounds':>6} {'syncs/round':>11}  by kind")
    for mode, b, t in itertools.product(
        args.modes.split(","),
        [int(x) for x in args.batches.split(",")],
        [float(x) for x in args.temps.split(",")],
    ):
        syncs, rounds = count(target, draft, mode, b, t, args.tokens, sites=bool(args.sites))
        per = syncs.total / rounds
        kinds = {k: round(v / rounds, 2) for k, v in syncs.by_kind.most_common()}
        print(f"{mode:>4} {b:2d} {t:3.0f} {rounds:6d} {per:11.2f}  {kinds}", flush=True)
        for site, n in syncs.sites.most_common(args.sites):
            print(f"        {n / rounds:6.2f}  {site}")
        out.append(
            {
                "mode": mode,
                "batch": b,
                "temperature": t,
                "rounds": rounds,
                "syncs_per_round": per,
                "by_kind": kinds,
            }
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
