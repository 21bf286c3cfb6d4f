"""The ``ssd bench`` command: AR, SD and SSD on the same prompts, one table, JSON and a plot.

Everything reported is measured in this run on this machine; the JSON records the
command line so the numbers can be reproduced.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ssd_core import ConfigError, Metrics, generate

from .common import config_from, encode_prompt, free_models, load_models, sampling_from
from .prompts import default_prompts

__all__ = ["aggregate", "run_bench"]

log = logging.getLogger("ssd_core.bench")


def aggregate(runs: Sequence[Metrics]) -> dict[str, float]:
    """Pool per-prompt metrics: counts and times are summed, rates recomputed from the
    sums (so a rate is never a mean of rates)."""
    s = {
        f: sum(getattr(m, f) for m in runs)
        for f in (
            "generated_tokens",
            "proposed_tokens",
            "accepted_tokens",
            "rejections",
            "speculated_rounds",
            "sequence_rounds",
            "cache_lookups",
            "cache_hits",
            "wall_s",
            "target_busy_s",
            "draft_busy_s",
            "rounds",
            "verify_total_s",
            "verify_calls",
            "jit_draft_total_s",
            "jit_draft_calls",
            "glue_total_s",
            "glue_calls",
            "tree_step_total_s",
            "tree_step_calls",
        )
    }

    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0

    mean_verify = ratio(s["verify_total_s"], s["verify_calls"])
    mean_acc = ratio(s["accepted_tokens"], s["speculated_rounds"])
    return {
        "tokens": s["generated_tokens"],
        "wall_s": s["wall_s"],
        "tokens_per_s": ratio(s["generated_tokens"], s["wall_s"]),
        "accepted_per_proposed": ratio(s["accepted_tokens"], s["proposed_tokens"]),
        "acceptance_per_token": ratio(s["accepted_tokens"], s["accepted_tokens"] + s["rejections"]),
        "mean_accepted_length": mean_acc,
        "tokens_per_target_pass": ratio(s["generated_tokens"], s["sequence_rounds"]),
        "cache_hit_rate": ratio(s["cache_hits"], s["cache_lookups"]),
        "target_busy_s": s["target_busy_s"],
        "draft_busy_s": s["draft_busy_s"],
        "rounds": s["rounds"],
        "mean_verify_s": mean_verify,
        "mean_jit_draft_s": ratio(s["jit_draft_total_s"], s["jit_draft_calls"]),
        "mean_glue_s": ratio(s["glue_total_s"], s["glue_calls"]),
        "mean_tree_step_s": ratio(s["tree_step_total_s"], s["tree_step_calls"]),
        # Saguaro's ideal SSD throughput: every round hides drafting completely.
        "ssd_bound_tokens_per_s": ratio(mean_acc + 1, mean_verify),
    }


def _progress(total: int, desc: str) -> Any:
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]

        return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
    except ImportError:
        return None


def _plot(rows: dict[str, dict[str, float]], path: Path, clock: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot written")
        return False
    modes = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    axes[0].bar(modes, [rows[m]["tokens_per_s"] for m in modes], color="#4c72b0")
    axes[0].set_title(f"tokens / s ({clock})")
    axes[1].bar(modes, [rows[m]["tokens_per_target_pass"] for m in modes], color="#55a868")
    axes[1].set_title("tokens per target pass")
    axes[2].bar(modes, [rows[m]["cache_hit_rate"] for m in modes], color="#c44e52")
    axes[2].set_ylim(0, 1)
    axes[2].set_title("cache hit rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_bench(args: argparse.Namespace) -> int:
    """Run the bench the parsed command line describes; returns the exit code."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        raise ConfigError("--modes needs at least one mode")
    target, draft = load_models(args, need_draft=any(m != "ar" for m in modes))
    try:
        raw = json.loads(Path(args.prompts).read_text()) if args.prompts else default_prompts()
        if isinstance(raw, dict):
            raw = raw["prompts"]
        entries = [r if isinstance(r, dict) else {"text": r, "chat": False} for r in raw]
        if args.limit:
            entries = entries[: args.limit]
        has_template = getattr(target, "apply_chat_template", None) is not None
        prompts: list[list[int]] = []
        for e in entries:
            text = e["text"]
            if isinstance(text, list):
                prompts.append([int(t) for t in text])
            elif getattr(target, "tokenizer", None) is None:
                # Id-only models: short id prompts derived from the text, deterministically.
                v = target.vocab_size
                prompts.append([(ord(c) * 7 + i) % v for i, c in enumerate(text[:12])] or [1])
            else:
                chat = args.chat or (bool(e.get("chat")) and has_template)
                prompts.append(encode_prompt(target, text, chat=chat))

        results: dict[str, list[Metrics]] = {}
        tokens: dict[str, list[list[int]]] = {}
        for mode in modes:
            bar = _progress(len(prompts), mode)
            results[mode], tokens[mode] = [], []
            for prompt in prompts:
                out = generate(
                    target, draft if mode != "ar" else None, prompts=[prompt], mode=mode,
                    max_new_tokens=args.max_new_tokens, sampling=sampling_from(args),
                    config=config_from(args), driver=args.driver, seed=args.seed,
                )  # fmt: skip
                results[mode].append(out.metrics)
                tokens[mode].append(out.tokens[0])
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
        rows = {mode: aggregate(ms) for mode, ms in results.items()}
        same = len({json.dumps(t) for t in tokens.values()}) == 1

        header = (
            f"{'mode':5s} {'tok/s':>8s} {'alpha':>7s} {'E[acc]':>7s} {'tok/pass':>8s} {'hit':>6s} "
            f"{'T_verify':>9s} {'T_draft':>8s} {'target_s':>9s} {'draft_s':>8s} {'wall_s':>7s} {'bound':>7s}"
        )
        print(header)
        for mode, r in rows.items():
            print(
                f"{mode:5s} {r['tokens_per_s']:8.1f} {r['acceptance_per_token']:7.1%} "
                f"{r['mean_accepted_length']:7.2f} {r['tokens_per_target_pass']:8.2f} "
                f"{r['cache_hit_rate']:6.1%} {r['mean_verify_s'] * 1e3:7.1f}ms {r['mean_jit_draft_s'] * 1e3:6.1f}ms "
                f"{r['target_busy_s']:9.2f} {r['draft_busy_s']:8.2f} {r['wall_s']:7.2f} "
                f"{r['ssd_bound_tokens_per_s']:7.1f}"
            )
        if args.temperature == 0.0:
            print(f"greedy outputs identical across modes: {same}")

        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        report = {
            "command": "ssd " + " ".join(sys.argv[1:])
            if sys.argv and "ssd" in Path(sys.argv[0]).name
            else None,
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "processor": platform.processor(),
            },
            "target": getattr(target, "name", "?"),
            "draft": getattr(draft, "name", None),
            "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "k": args.k,
            "fanout": args.fanout,
            "saguaro_c": args.saguaro_c,
            "fallback": args.fallback,
            "temperature": args.temperature,
            "driver": args.driver,
            "greedy_identical": same if args.temperature == 0.0 else None,
            "modes": rows,
            "per_prompt": {m: [x.as_dict() for x in ms] for m, ms in results.items()},
        }
        (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
        clock = "simulated clock" if args.driver == "simulated" else "wall clock"
        plotted = _plot(rows, out_dir / "bench.png", clock)
        print(
            f"wrote {out_dir / 'bench.json'}" + (f" and {out_dir / 'bench.png'}" if plotted else "")
        )
        return 0
    finally:
        free_models(target, draft)
