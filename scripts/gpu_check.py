"""One short, prepared GPU check for the torch backend.

On a machine with CUDA it (1) runs the torch backend's tests (CUDA parametrisations
included), (2) times the backend's per-call costs on ``cuda:0`` for the bundled SmolLM2
(AR step, K+1 verification, N-branch tree step; padded vs per-sequence batching), and
(3) if the core is present (``ssd_core.generate``), times AR, SD and SSD end to end.
On a machine without CUDA it says so and exits 0 (``--cpu`` runs the same on CPU).

Usage::

    PYTHONPATH=. python scripts/gpu_check.py [--cpu] [--skip-tests] [--tokens 64]
    PYTHONPATH=. python scripts/gpu_check.py --cpu --skip-tests --target tiny --draft tiny,seed=1
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time

log = logging.getLogger("gpu_check")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str, reps: int = 10) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def per_call_costs(spec: str, device: str, dtype: str) -> None:
    from backends.torch import BACKEND

    t0 = time.perf_counter()
    model = BACKEND.load(spec, {"device": device, "dtype": dtype})
    log.info("load %s (%s, %s): %.1f s", spec, device, dtype, time.perf_counter() - t0)
    if model.tokenizer is not None:
        ids = model.tokenizer.encode("The capital of France is")
        h = model.open(ids[:-1])
        top = int(model.extend([(h, ids[-1:])])[0].argmax())
        log.info("top-1 after 'The capital of France is': %r", model.tokenizer.decode([top]))
    root = model.open([(100 + i) % model.vocab_size for i in range(128)])
    model.extend([(root, [5])])

    def step(tokens: int, n: int, batching: str) -> None:
        model.batching = batching
        hs = [model.fork(root, 129 - (i % 5)) for i in range(n)]
        out = model.extend([(x, [7] * tokens) for x in hs])
        float(out[-1, 0])
        for x in hs:
            model.close(x)

    log.info("AR step (1 seq x 1 tok): %.2f ms", 1e3 * _time(lambda: step(1, 1, "pad"), device))
    log.info("verify (1 seq x 5 tok): %.2f ms", 1e3 * _time(lambda: step(5, 1, "pad"), device))
    for n in (4, 16, 32):
        pad = _time(lambda n=n: step(1, n, "pad"), device)
        loop = _time(lambda n=n: step(1, n, "loop"), device, reps=3)
        log.info("tree step %2d x 1 tok: pad %.2f ms, loop %.2f ms", n, 1e3 * pad, 1e3 * loop)


def end_to_end(target_spec: str, draft_spec: str, device: str, dtype: str, tokens: int) -> None:
    try:
        from ssd_core import SamplingParams, SSDConfig, generate
    except ImportError:
        log.info("ssd_core.generate not available yet: skipping AR/SD/SSD timing")
        return
    from backends.torch import BACKEND

    target = BACKEND.load(target_spec, {"device": device, "dtype": dtype})
    draft = BACKEND.load(draft_spec, {"device": device, "dtype": dtype, "target": target,
                                      "target_args": target_spec})
    text = "Write a short story about a lighthouse keeper."
    chat = getattr(target, "apply_chat_template", None)
    # the instruct model answers a bare sentence with end-of-turn at once; use its template
    if chat is not None:
        prompt = chat([{"role": "user", "content": text}])
    elif target.tokenizer is not None:
        prompt = target.tokenizer.encode(text)
    else:
        prompt = [1, 2, 3, 4]
    results = {}
    for mode in ("ar", "sd", "ssd"):
        for driver in ("sequential", "threaded") if mode == "ssd" else ("sequential",):
            t0 = time.perf_counter()
            try:
                res = generate(target, draft, prompts=[prompt], mode=mode, max_new_tokens=tokens,
                               sampling=SamplingParams(temperature=0.0), config=SSDConfig(k=4),
                               driver=driver, seed=0)
            except Exception as exc:  # report and continue: this is a diagnostic script
                log.error("%s/%s failed: %s: %s", mode, driver, type(exc).__name__, exc)
                continue
            dt = time.perf_counter() - t0
            toks = list(res.tokens[0])
            results[(mode, driver)] = toks
            summary = getattr(res.metrics, "summary", None)
            log.info("%-3s %-10s %6.1f tok/s  (%d tokens in %.2f s)  %s", mode, driver,
                     len(toks) / dt, len(toks), dt, summary() if callable(summary) else res.metrics)
    ar = results.get(("ar", "sequential"))
    for key, toks in results.items():
        if ar is not None and toks != ar:
            log.warning("greedy output of %s differs from AR", key)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run everything on CPU anyway")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--target", default="smollm2", help="torch spec of the target")
    parser.add_argument("--draft", default="smollm2,layers=25", help="torch spec of the draft")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    if torch.cuda.is_available():
        device = "cuda:0"
        log.info("GPU: %s, torch %s, CUDA %s", torch.cuda.get_device_name(0), torch.__version__,
                 torch.version.cuda)
    elif args.cpu:
        device, args.dtype = "cpu", "float32"
    else:
        log.info("no CUDA device here: nothing to check (use --cpu to run the same on CPU)")
        return 0
    rc = 0
    if not args.skip_tests:
        rc = subprocess.call([sys.executable, "-m", "pytest", "tests/torch", "-q", "-x"])
        log.info("torch tests: exit code %d", rc)
    per_call_costs(args.target, device, args.dtype)
    end_to_end(args.target, args.draft, device, args.dtype, args.tokens)
    return rc


if __name__ == "__main__":
    sys.exit(main())
