"""Threaded-driver overlap with two llama.cpp contexts (draft and target on their own threads).

Target: the bundled SmolLM2; draft: a second context of the same GGUF (or --draft PATH),
each with ``--threads`` threads. Reports, per driver, the wall time, each lane's busy
time and wall / max(lanes) — 1.0 is perfect overlap (issue goal: <= 1.05).

    PYTHONPATH=. python scripts/bench_overlap_llama.py --max-new-tokens 48
"""

from __future__ import annotations

import argparse
import sys

from backends.llama_cpp import bundled_prompts, from_gguf, smollm2_path
from ssd_core import SamplingParams, SSDConfig, generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draft", default="", help="draft GGUF (default: SmolLM2 again)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--fanout", type=int, default=8)
    args = parser.parse_args(argv)
    target = from_gguf(smollm2_path(), n_threads=args.threads, n_ctx=512, n_seq_max=4)
    draft = from_gguf(
        args.draft or smollm2_path(), n_threads=args.threads, n_ctx=512, n_seq_max=64,
        batch_invariant=False,
    )  # fmt: skip
    prompts = [p["tokens"] for p in bundled_prompts(target)[: args.prompts]]
    print(
        f"{'driver':>10} {'wall_s':>7} {'target_s':>8} {'draft_s':>7} {'wall/max':>8} {'hit':>5} {'acc':>5}"
    )
    for driver in ("sequential", "threaded"):
        wall = t_busy = d_busy = 0.0
        hits = lookups = acc = prop = 0
        for p in prompts:
            m = generate(
                target, draft, prompts=[p], mode="ssd", max_new_tokens=args.max_new_tokens,
                sampling=SamplingParams(temperature=0.0),
                config=SSDConfig(k=4, fanout=args.fanout), driver=driver, seed=0,
            ).metrics  # fmt: skip
            wall += m.wall_s
            t_busy += m.target_busy_s
            d_busy += m.draft_busy_s
            hits += m.cache_hits
            lookups += m.cache_lookups
            acc += m.accepted_tokens
            prop += m.proposed_tokens
        print(
            f"{driver:>10} {wall:7.2f} {t_busy:8.2f} {d_busy:7.2f} "
            f"{wall / max(t_busy, d_busy):8.3f} {hits / max(lookups, 1):5.0%} {acc / max(prop, 1):5.0%}"
        )
    target.free()
    draft.free()
    return 0


if __name__ == "__main__":
    sys.exit(main())
