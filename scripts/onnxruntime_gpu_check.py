"""A short prepared check of the onnxruntime backend on a CUDA machine (not needed in CI).

Exports a tiny target/draft pair, loads the target on CUDA (IOBinding, padded batching)
and on the CPU, and checks: CUDA really is the active provider; CUDA logits match CPU
logits (max |diff| reported); fork/truncate/batched extends match fresh prefills on
CUDA; greedy AR == SD == SSD on CUDA; per-call timings. Exits non-zero on any failure,
and with status 2 when the CUDA provider does not load (libraries missing).

Usage::

    PYTHONPATH=. python scripts/onnxruntime_gpu_check.py [--cpu-dry-run]

``--cpu-dry-run`` runs every step on whatever provider loads (to test this script).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from backends.onnxruntime import CPU, CUDA, OrtModel, export_tiny_llama
from ssd_core import SamplingParams, SSDConfig, generate

TARGET = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=768,
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
    context_size=1024,
    seed=1,
)
DRAFT = dict(
    TARGET, hidden_size=64, intermediate_size=192, num_layers=1, num_heads=2, num_kv_heads=1, seed=2
)


def fresh(model: OrtModel, tokens: list[int]) -> np.ndarray:
    h = model.open([])
    out = model.extend([(h, tokens)])
    model.close(h)
    return out


def main() -> int:
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        tpath = export_tiny_llama(Path(tmp) / "t.onnx", name="target", **TARGET)
        dpath = export_tiny_llama(Path(tmp) / "d.onnx", name="draft", **DRAFT)
        gpu = OrtModel.from_file(tpath)
        print(
            f"provider={gpu.provider} io_binding={gpu.io_binding} batching={gpu.batching} "
            f"fell_back={gpu.providers.fell_back}"
        )
        if gpu.provider != CUDA and "--cpu-dry-run" not in sys.argv:
            print("CUDA provider did not load; nothing to check on the GPU")
            return 2
        cpu = OrtModel.from_file(tpath, providers=[CPU])
        rng = np.random.default_rng(0)
        toks = rng.integers(0, TARGET["vocab_size"], 200).tolist()
        g, c = fresh(gpu, toks), fresh(cpu, toks)
        diff = float(np.abs(g - c).max())
        agree = float((g.argmax(-1) == c.argmax(-1)).mean())
        print(
            f"CUDA vs CPU over {len(toks)} positions: max|diff|={diff:.2e} top-1 agreement={agree:.3f}"
        )
        if diff > 1e-2 or agree < 0.99:
            failures.append("CUDA logits differ from CPU logits")
        # contract on CUDA
        h = gpu.open(toks[:50])
        part = gpu.extend([(h, toks[50:60])])
        kid = gpu.fork(h, 55)
        gpu.truncate(h, 52)
        hs = [gpu.open(toks[:30]), h, kid]
        batch = gpu.extend([(x, [7]) for x in hs])
        want = np.concatenate([fresh(gpu, toks[:n] + [7])[-1:] for n in (30, 52, 55)])
        for name, a, b in (("pieces", part, fresh(gpu, toks[:60])[50:]), ("batched", batch, want)):
            d = float(np.abs(a - b).max())
            print(f"{name} vs fresh on CUDA: max|diff|={d:.2e}")
            if d > 1e-3:
                failures.append(f"{name} extend differs from fresh prefill on CUDA")
        for x in hs:
            gpu.close(x)
        # greedy identity and timing on CUDA
        draft = OrtModel.from_file(dpath)
        prompts = [toks[:16], toks[16:24]]
        greedy = SamplingParams(temperature=0.0)
        ar = None
        for mode in ("ar", "sd", "ssd"):
            t0 = time.perf_counter()
            out = generate(
                gpu,
                draft,
                prompts=prompts,
                mode=mode,
                max_new_tokens=64,
                sampling=greedy,
                config=SSDConfig(k=4),
            )
            dt = time.perf_counter() - t0
            print(f"{mode}: {128 / dt:.1f} tok/s  {out.metrics.summary()}")
            ar = ar or out.tokens
            if out.tokens != ar:
                failures.append(f"greedy {mode} != ar on CUDA")
        base = gpu.open(toks[:100])
        gpu.extend([(base, [1])])
        for n in (1, 24):
            hs = [gpu.fork(base, 101) for _ in range(n)]
            t0 = time.perf_counter()
            for _ in range(20):
                gpu.extend([(x, [2]) for x in hs])
                for x in hs:
                    gpu.truncate(x, 101)
            print(f"{n}x1 extend on CUDA: {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms")
    for f in failures:
        print("FAIL:", f)
    print("OK" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
