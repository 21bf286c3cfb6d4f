"""Measure padded batching against one forward per sequence for the torch backend.

The workload is the tree-decode shape: N handles forked from one root at different
depths (so their past lengths differ and padding is needed), each extended by
``--tokens`` tokens. Prints one line per N with the median time per extend call.

Usage::

    PYTHONPATH=. python scripts/bench_torch_batching.py --model smollm2 --ns 1,2,4,8,16,32
    PYTHONPATH=. python scripts/bench_torch_batching.py --model tiny
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

log = logging.getLogger("bench_torch_batching")


def _load(spec: str, batching: str, device: str, dtype: str):
    from backends.torch import BACKEND

    return BACKEND.load(spec, {"device": device, "dtype": dtype, "batching": batching})


def _time_once(model, n: int, tokens: int, prompt_len: int, reps: int) -> float:
    root = model.open([1 + (i * 7) % (model.vocab_size - 1) for i in range(prompt_len)])
    model.extend([(root, [7, 8, 9, 10])])
    times = []
    for _ in range(reps + 1):  # the first repetition warms up and is dropped
        handles = [model.fork(root, prompt_len + (i % 5)) for i in range(n)]
        reqs = [(h, [11 + (i % 7)] * tokens) for i, h in enumerate(handles)]
        t0 = time.perf_counter()
        out = model.extend(reqs)
        float(out[0, 0])  # force completion (a device sync on CUDA)
        times.append(time.perf_counter() - t0)
        for h in handles:
            model.close(h)
    model.close(root)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="torch spec: tiny, smollm2, a path")
    parser.add_argument("--ns", default="1,2,4,8,16,32")
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: keep)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    models = {b: _load(args.model, b, args.device, args.dtype) for b in ("pad", "loop")}
    log.info("model=%s device=%s dtype=%s tokens/seq=%d prompt=%d threads=%d",
             args.model, args.device, args.dtype, args.tokens, args.prompt, torch.get_num_threads())
    log.info("%4s %12s %12s %8s", "N", "pad ms", "loop ms", "loop/pad")
    for n in (int(x) for x in args.ns.split(",")):
        t = {b: _time_once(m, n, args.tokens, args.prompt, args.reps) for b, m in models.items()}
        log.info("%4d %12.2f %12.2f %8.2f", n, 1e3 * t["pad"], 1e3 * t["loop"], t["loop"] / t["pad"])


if __name__ == "__main__":
    main()
