"""Measure draft acceptance on the bundled SmolLM2 and the bundled prompts.

For each candidate draft spec, runs greedy speculative decoding (and optionally SSD)
prompt by prompt, checks that the tokens equal plain greedy decoding (AR), and reports
acceptance rate, mean accepted length and tokens per target pass.

Usage (from a source checkout)::

    PYTHONPATH=. python scripts/measure_llama.py --max-new-tokens 64 \\
        --drafts ngram:max_n=1 ngram:max_n=2 ngram:max_n=3 ngram:max_n=4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from backends.llama_cpp import bundled_prompts, from_gguf, smollm2_path
from ssd_core import SamplingParams, SSDConfig, generate
from ssd_core.app import load_backend

logger = logging.getLogger("measure_llama")


def _load_draft(spec: str, target: Any, threads: int) -> Any:
    name, _, args = spec.partition(":")
    options = {"vocab_size": target.vocab_size, "n_threads": threads, "batch_invariant": False}
    return load_backend(name).load(args, options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="", help="GGUF path (default: bundled SmolLM2)")
    parser.add_argument("--drafts", nargs="+", default=[f"ngram:max_n={n}" for n in (1, 2, 3, 4)])
    parser.add_argument("--modes", nargs="+", default=["sd"], choices=["sd", "ssd"])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument(
        "--temperature", type=float, default=0.0,
        help="0 = greedy (tokens must equal AR); > 0 samples, identity is not checked",
    )  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    target = from_gguf(
        args.target or smollm2_path(), n_threads=args.threads, n_ctx=1024, n_seq_max=4
    )
    prompts = bundled_prompts(target)[: args.limit]
    greedy = SamplingParams(temperature=args.temperature)
    config = SSDConfig(k=args.k)
    ar: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    for p in prompts:
        res = generate(
            target,
            None,
            prompts=[p["tokens"]],
            mode="ar",
            max_new_tokens=args.max_new_tokens,
            sampling=greedy,
            seed=0,
        )
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
                    target,
                    draft,
                    prompts=[p["tokens"]],
                    mode=mode,
                    max_new_tokens=args.max_new_tokens,
                    sampling=greedy,
                    config=config,
                    seed=0,
                )
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
                spec,
                mode,
                row["acceptance_rate"],
                row["tokens_per_target_pass"],
                identical,
                wall,
                ar_s,
            )
    target.free()
    result = {
        "target": str(args.target or smollm2_path().name),
        "k": args.k,
        "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens,
        "prompts": len(prompts),
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0 if all(r["identical_to_ar"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
