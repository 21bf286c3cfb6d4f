"""Per-call cost of the onnxruntime backend, and AR/SD/SSD wall-clock, on tiny exported Llamas.

Exports random-weight models to a temporary folder (nothing is downloaded), then times
the extend shapes the core issues: one sequence x 1 token (AR / just-in-time draft),
1 x K+1 tokens (verification, glue pass), N x 1 token (one tree-decode step) under both
batching strategies, and a short greedy AR/SD/SSD run. Prints a table; ``--json`` writes
the numbers too.

Usage::

    PYTHONPATH=. python scripts/onnxruntime_bench.py [--threads 1] [--repeat 50] [--providers CPUExecutionProvider]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from backends.onnxruntime import OrtModel, export_tiny_llama
from ssd_core import SamplingParams, SSDConfig, generate

SIZES = {
    "tiny": dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    ),
    "small": dict(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
    ),
}
DRAFT = dict(
    vocab_size=8192,
    hidden_size=64,
    intermediate_size=192,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
)


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def bench_calls(model: OrtModel, repeat: int, context: int = 64) -> dict[str, float]:
    rng = np.random.default_rng(0)
    base = model.open(rng.integers(0, model.vocab_size, context).tolist())
    model.extend([(base, [1])])
    out: dict[str, float] = {}

    def one(n_tokens: int) -> None:
        h = model.fork(base, context + 1)
        model.extend([(h, [2] * n_tokens)])
        model.close(h)

    out["1x1"] = _time(lambda: one(1), repeat)
    out["1x5"] = _time(lambda: one(5), repeat)
    for n in (8, 24):

        def tree(n: int = n) -> None:
            hs = [model.fork(base, context + 1 - (i % 3)) for i in range(n)]  # ragged lengths
            model.extend([(h, [3]) for h in hs])
            for h in hs:
                model.close(h)

        out[f"{n}x1"] = _time(tree, max(repeat // 5, 3))
    model.close(base)
    return out


def bench_spinning(path: str, calls: int = 40) -> dict[str, float]:
    """1 x 1 extend on a 65-token context, threads 1/2 x spinning on/off."""
    out = {}
    for threads in (1, 2):
        for spin in (True, False):
            m = OrtModel.from_file(
                path, providers=["CPUExecutionProvider"], threads=threads, spinning=spin
            )
            h = m.open(list(range(64)))
            m.extend([(h, [1])])

            def step(m: OrtModel = m, h: object = h) -> None:
                m.extend([(h, [2])])
                m.truncate(h, 65)

            out[f"threads={threads},spin={int(spin)}"] = _time(step, calls)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-spin", action="store_true", help="turn intra-op spinning off")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument(
        "--providers", default=None, help="+-separated provider names (default: auto)"
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--onnx", type=Path, default=None, help="also time this existing graph")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--spin-compare", action="store_true", help="also time spinning on/off")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    providers = args.providers.split("+") if args.providers else None
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size, kw in SIZES.items():
            path = export_tiny_llama(
                Path(tmp) / f"{size}.onnx", name=size, context_size=512, seed=1, **kw
            )
            for batching in ("sequential", "padded"):
                m = OrtModel.from_file(
                    path,
                    providers=providers,
                    threads=args.threads,
                    spinning=False if args.no_spin else None,
                    batching=batching,
                )
                r = bench_calls(m, args.repeat)
                results[f"{size}/{batching}"] = r
                print(
                    f"{size:5s} {batching:10s} {m.provider:22s} "
                    + "  ".join(f"{k}={v:7.2f}ms" for k, v in r.items()),
                    flush=True,
                )
        if args.spin_compare:
            r = bench_spinning(str(Path(tmp) / "small.onnx"))
            results["small/spinning"] = r
            print("small 1x1 " + "  ".join(f"{k}: {v:.2f}ms" for k, v in r.items()), flush=True)
        if args.onnx is not None:
            for batching in ("sequential", "padded"):
                m = OrtModel.from_file(
                    args.onnx,
                    providers=providers,
                    threads=args.threads,
                    spinning=False if args.no_spin else None,
                    batching=batching,
                )
                r = bench_calls(m, max(args.repeat // 5, 3))
                results[f"{m.name}/{batching}"] = r
                print(
                    f"{m.name} {batching:10s} {m.provider:22s} "
                    + "  ".join(f"{k}={v:7.2f}ms" for k, v in r.items()),
                    flush=True,
                )
        if args.skip_generate:
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
            return
        tpath = export_tiny_llama(
            Path(tmp) / "t.onnx", name="target", context_size=512, seed=1, **SIZES["small"]
        )
        dpath = export_tiny_llama(
            Path(tmp) / "d.onnx", name="draft", context_size=512, seed=2, **DRAFT
        )
        target = OrtModel.from_file(
            tpath,
            providers=providers,
            threads=args.threads,
            spinning=False if args.no_spin else None,
        )
        draft = OrtModel.from_file(
            dpath,
            providers=providers,
            threads=args.threads,
            spinning=False if args.no_spin else None,
        )
        prompts = [[1, 2, 3, 4, 5, 6, 7, 8]]
        same = OrtModel.from_file(
            tpath,
            providers=providers,
            threads=args.threads,
            spinning=False if args.no_spin else None,
        )
        for mode, d in (
            ("ar", draft),
            ("sd", draft),
            ("ssd", draft),
            ("sd-self", same),
            ("ssd-self", same),
        ):
            t0 = time.perf_counter()
            res = generate(
                target,
                d,
                prompts=prompts,
                mode=mode.split("-")[0],
                max_new_tokens=args.new_tokens,
                sampling=SamplingParams(temperature=0.0),
                config=SSDConfig(k=4),
            )
            dt = time.perf_counter() - t0
            results[f"generate/{mode}"] = {"seconds": dt, "tok_per_s": args.new_tokens / dt}
            print(
                f"generate {mode:8s}: {args.new_tokens / dt:7.1f} tok/s  ({res.metrics.summary() if hasattr(res.metrics, 'summary') else ''})"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
