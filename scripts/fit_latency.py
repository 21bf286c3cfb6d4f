"""Fit a LatencyModel (per_call + per_token * tokens) to a real model's extends.

For each model spec, opens one sequence on a prompt, then times ``extend`` calls of
1..16 new tokens on that sequence (truncating back after each, so every call sees the
same context length), interleaving the sizes over several repeats. The fit is ordinary
least squares of the median time per size. It also times N sequences x 1 token (forked
copies) to check the fit on the tree-decode shape the draft runs.

The result feeds the ``smollm2-cpu`` preset of ``ssd simulate``
(``ssd_core/app/simulate.py``). Run it on a quiet machine; it records the load average.

Usage (from a source checkout)::

    PYTHONPATH=. python scripts/fit_latency.py --json fit.json \\
        --model target=torch:smollm2 --model draft=llama_cpp:smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

from ssd_core import free_model
from ssd_core.app import load_backend

SIZES = (1, 2, 3, 4, 6, 8, 12, 16)  # default extend sizes (tokens on one sequence)
FANOUTS = (1, 4, 8, 16)


def _load(spec: str, threads: int) -> Any:
    role, sep, rest = spec.partition("=")
    if not sep or role not in ("target", "draft"):
        role, rest = "target", spec
    name, _, args = rest.partition(":")
    # A draft role gets the backend's draft defaults (llama.cpp: one unified KV pool).
    options: dict[str, Any] = {"threads": threads, "role": role}
    if name == "torch":
        options["dtype"] = "float32"
    if name == "llama_cpp":
        options["n_seq_max"] = max(FANOUTS) + 1
    return load_backend(name).load(args, options)


def _time(fn: Any) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one call. With one engine thread the
    work runs on the calling thread, so CPU time is what the call costs even when other
    processes share the cores (wall time then includes waiting for a core)."""
    w0, c0 = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - w0, time.thread_time() - c0


def _line(sizes: tuple[int, ...], med: dict[int, float]) -> tuple[float, float, float]:
    x = np.array(sizes, dtype=np.float64)
    y = np.array([med[n] for n in sizes])
    per_token, per_call = np.polyfit(x, y, 1)
    resid = y - (per_call + per_token * x)
    return float(per_call), float(per_token), float(np.abs(resid).max())


def fit(
    spec: str, *, threads: int, repeats: int, prompt_len: int, sizes: tuple[int, ...] = SIZES
) -> dict[str, Any]:
    model = _load(spec, threads)
    try:
        vocab = int(model.vocab_size)
        rng = np.random.default_rng(0)
        prompt = [int(t) for t in rng.integers(10, min(vocab, 30000), prompt_len)]
        h = model.open(prompt)
        new = [int(t) for t in rng.integers(10, min(vocab, 30000), max(sizes))]
        for n in sizes:  # warm-up
            model.extend([(h, new[:n])])
            model.truncate(h, prompt_len)
        times: dict[str, dict[int, list[float]]] = {
            "wall": {n: [] for n in sizes},
            "cpu": {n: [] for n in sizes},
        }
        for _ in range(repeats):
            for n in sizes:
                wall, cpu = _time(lambda n=n: model.extend([(h, new[:n])]))
                times["wall"][n].append(wall)
                times["cpu"][n].append(cpu)
                model.truncate(h, prompt_len)
        med = {c: {n: statistics.median(v) for n, v in times[c].items()} for c in times}
        fits = {c: _line(sizes, med[c]) for c in med}

        # The tree-decode shape: F forked sequences, one token each.
        tree: dict[str, dict[int, float]] = {"wall": {}, "cpu": {}}
        if hasattr(model, "fork"):
            for f in FANOUTS:
                hs = [model.fork(h, prompt_len) for _ in range(f)]
                samples: list[tuple[float, float]] = []
                for r in range(repeats):
                    batch = [(x_, [new[r % len(new)]]) for x_ in hs]
                    samples.append(_time(lambda batch=batch: model.extend(batch)))
                    for x_ in hs:
                        model.truncate(x_, prompt_len)
                tree["wall"][f] = statistics.median(w for w, _ in samples)
                tree["cpu"][f] = statistics.median(c for _, c in samples)
                for x_ in hs:
                    model.close(x_)
        model.close(h)
    finally:
        free_model(model)
    out: dict[str, Any] = {"model": spec, "threads": threads, "prompt_len": prompt_len,
                           "repeats": repeats}  # fmt: skip
    for c, (per_call, per_token, resid) in fits.items():
        out[c] = {
            "median_s_by_tokens": {str(n): med[c][n] for n in sizes},
            "per_call_ms": per_call * 1e3,
            "per_token_ms": per_token * 1e3,
            "max_abs_residual_ms": resid * 1e3,
            "tree_median_s_by_sequences": {str(f): t for f, t in tree[c].items()},
            "tree_predicted_s_by_sequences": {str(f): per_call + per_token * f for f in tree[c]},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=None,
                        help="[target=|draft=]backend:args (repeatable; default llama_cpp:smollm2)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--json", default=None, help="write the fits here")
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)),
        help="extend sizes (tokens) to time and fit, e.g. 1,4,5,6,7,8 for AR and K=3..7 verifies",
    )  # fmt: skip
    args = parser.parse_args(argv)
    specs = args.model or ["llama_cpp:smollm2"]
    load_before = os.getloadavg()
    fits = []
    for spec in specs:
        sizes = tuple(int(x) for x in args.sizes.split(","))
        r = fit(spec, threads=args.threads, repeats=args.repeats, prompt_len=args.prompt_len,
                sizes=sizes)  # fmt: skip
        fits.append(r)
        for clock in ("cpu", "wall"):
            c = r[clock]
            print(
                f"{spec} ({clock} time): per_call {c['per_call_ms']:.2f} ms, per_token "
                f"{c['per_token_ms']:.3f} ms (max residual {c['max_abs_residual_ms']:.2f} ms)"
            )
            for f, t in c["tree_median_s_by_sequences"].items():
                pred = c["tree_predicted_s_by_sequences"][f]
                print(
                    f"  {f:>2s} sequences x 1 token: {t * 1e3:7.2f} ms (fit {pred * 1e3:7.2f} ms)"
                )
    report = {
        "command": "python " + " ".join(sys.argv),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "fits": fits,
    }
    print(f"load average before {load_before}, after {report['loadavg_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
