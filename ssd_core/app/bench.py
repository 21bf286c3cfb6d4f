"""The ``ssd bench`` command: AR, SD and SSD on the same prompts, one table, JSON and a plot.

Everything reported is measured in this run on this machine; the JSON records the
command line so the numbers can be reproduced. Metrics come from
:class:`ssd_core.Metrics`, pooled over prompts by :func:`aggregate`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ssd_core import MODES, ConfigError, InputError, Metrics, UnknownOptionError, generate

from .common import (
    budget,
    check_decode_args,
    check_model_args,
    free_models,
    load_models,
)
from .console import (
    encode_prompt,
    note,
)
from .prompts import default_prompts

__all__ = [
    "LEGEND",
    "aggregate",
    "check_out_dir",
    "load_prompt_entries",
    "panels_for",
    "run_bench",
]

log = logging.getLogger("ssd_core.bench")

#: What each table column means (printed under the table and by ``ssd bench --help``).
LEGEND = """\
  mode      ar: target only; sd: the draft proposes K tokens, the target verifies;
            ssd: Saguaro, the draft pre-speculates for likely outcomes while the target verifies
  tok/s     generated tokens per second, pooled over prompts (sum of tokens / sum of seconds)
  range     the slowest and the fastest prompt's tokens per second
  alpha     per-token acceptance: accepted / (accepted + rejected) draft tokens, the chance
            that one more draft token is accepted (Saguaro's a)
  E[acc]    mean accepted draft tokens per speculated round (the bonus token not counted)
  tok/pass  generated tokens per target pass (1.00 for ar)
  hit       ssd: share of rounds whose next speculation was already cached
  T_verify  mean seconds of one target verification call (K + 1 rows)
  T_draft   mean seconds of one just-in-time draft step (sd, and ssd on a cache miss)
  target_s  seconds the target was busy; draft_s: the draft
  wall_s    seconds from the first to the last token, all prompts
  bound     Saguaro's ideal SSD throughput (E[acc] + 1) / T_verify: every round's drafting
            hidden behind verification (sd and ssd rows)
  -         does not apply to this mode"""

#: Pooled counters and times (summed over prompts).
_SUMMED = (
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


def positive_limit(text: str) -> int:
    """``--limit``: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be >= 1 (use every prompt: leave it out), got {value}"
        )
    return value


def aggregate(runs: Sequence[Metrics]) -> dict[str, float]:
    """Pool per-prompt metrics: counts and times are summed, rates recomputed from the
    sums (so a rate is never a mean of rates); ``tokens_per_s_min``/``_max`` give the
    spread over prompts."""
    s = {f: sum(getattr(m, f) for m in runs) for f in _SUMMED}

    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0

    mean_verify = ratio(s["verify_total_s"], s["verify_calls"])
    mean_acc = ratio(s["accepted_tokens"], s["speculated_rounds"])
    per_prompt = [m.tokens_per_second for m in runs]
    return {
        "tokens": s["generated_tokens"],
        "wall_s": s["wall_s"],
        "tokens_per_s": ratio(s["generated_tokens"], s["wall_s"]),
        "tokens_per_s_min": min(per_prompt, default=0.0),
        "tokens_per_s_max": max(per_prompt, default=0.0),
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


# -- checks before any model is loaded ---------------------------------------------------


def load_prompt_entries(path: str | None) -> list[dict[str, Any]]:
    """The prompt entries of ``--prompts`` (or the bundled set), checked.

    Raises:
        InputError: an unreadable file, invalid JSON, or entries of the wrong shape.
    """
    if path is None:
        raw: Any = default_prompts()
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read --prompts {path!r}: {exc.strerror}") from None
        try:
            raw = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise InputError(f"--prompts {path!r} is not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise InputError(
                f"--prompts {path!r} is not valid JSON: {exc.msg} (line {exc.lineno}, "
                f"column {exc.colno})"
            ) from None
    if isinstance(raw, dict):
        raw = raw.get("prompts")
    shape = (
        'a list of strings or token-id lists, or {"prompts": [{"text": ..., "chat": bool}, ...]}'
    )
    if not isinstance(raw, list) or not raw:
        raise InputError(f"--prompts {path!r} must hold {shape}")
    entries = []
    for i, r in enumerate(raw):
        e = r if isinstance(r, dict) else {"text": r, "chat": False}
        text = e.get("text")
        ok = (isinstance(text, str) and text.strip()) or (
            isinstance(text, list)
            and text
            and all(isinstance(t, int) and not isinstance(t, bool) for t in text)
        )
        if not ok:
            raise InputError(f"--prompts {path!r}: prompt {i} is not {shape}")
        entries.append(e)
    return entries


def check_out_dir(out: str) -> Path:
    """Make ``--out`` (and its parents) and check that bench.json and bench.png can be
    written there, before the run.

    Raises:
        InputError: naming the path and the reason.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {out!r} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create --out folder {out!r}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"cannot write into --out folder {out!r}: permission denied")
    for name in ("bench.json", "bench.png"):
        f = path / name
        if f.exists() and (f.is_dir() or not os.access(f, os.W_OK)):
            raise InputError(f"cannot overwrite {str(f)!r}")
    return path


# -- output -------------------------------------------------------------------------------


class _Progress:
    """Per-prompt progress on stderr: a tqdm bar on a terminal (when tqdm is installed),
    else one line per mode."""

    def __init__(self, total: int, desc: str) -> None:
        self.bar: Any = None
        tty = getattr(sys.stderr, "isatty", None)
        if tty is not None and tty():
            try:
                from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
                return
            except ImportError:
                pass
        note(f"bench: {desc} on {total} prompt{'s' if total != 1 else ''} ...")

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cell(value: float, fmt: str, applies: bool) -> str:
    return format(value, fmt) if applies else "-"


def _table(rows: dict[str, dict[str, float]]) -> list[str]:
    header = (
        f"{'mode':5s} {'tok/s':>8s} {'range':>13s} {'alpha':>7s} {'E[acc]':>7s} "
        f"{'tok/pass':>8s} {'hit':>6s} {'T_verify':>9s} {'T_draft':>8s} {'target_s':>9s} "
        f"{'draft_s':>8s} {'wall_s':>7s} {'bound':>7s}"
    )
    lines = [header]
    for mode, r in rows.items():
        spec = mode != "ar"
        span = f"{r['tokens_per_s_min']:.1f}-{r['tokens_per_s_max']:.1f}"
        t_draft = f"{r['mean_jit_draft_s'] * 1e3:.1f}ms" if spec and r["mean_jit_draft_s"] else "-"
        lines.append(
            f"{mode:5s} {r['tokens_per_s']:8.1f} {span:>13s} "
            f"{_cell(r['acceptance_per_token'], '7.1%', spec):>7s} "
            f"{_cell(r['mean_accepted_length'], '7.2f', spec):>7s} "
            f"{r['tokens_per_target_pass']:8.2f} "
            f"{_cell(r['cache_hit_rate'], '6.1%', mode == 'ssd'):>6s} "
            f"{r['mean_verify_s'] * 1e3:7.1f}ms {t_draft:>8s} "
            f"{r['target_busy_s']:9.2f} {_cell(r['draft_busy_s'], '8.2f', spec):>8s} "
            f"{r['wall_s']:7.2f} {_cell(r['ssd_bound_tokens_per_s'], '7.1f', spec):>7s}"
        )
    return lines


def _title(report: dict[str, Any]) -> str:
    draft = report["draft"] or "none"
    line1 = (
        f"ssd bench: target {report['target']} ({report['backend']}), draft {draft}; "
        f"{report['prompts']} prompts x up to {report['max_new_tokens']} tokens"
    )
    line2 = (
        f"K={report['k']}, fan-out {report['fanout']}, C={report['saguaro_c'] or 'by temperature'}, "
        f"fallback {report['fallback']}, temperature {report['temperature']}, "
        f"{report['driver']} driver ({report['clock']}); {report['when']}, "
        f"{report['machine']['platform']}"
    )
    return line1 + "\n" + line2


Panel = tuple[str, list[str], str, str, "float | None", str]


def panels_for(modes: Sequence[str], clock: str) -> list[Panel]:
    """The plot's panels: only those that apply to ``modes``.

    Returns:
        ``(title, modes it applies to, pooled field, per-prompt Metrics field, y limit,
        label format)`` per panel: tokens/s always; tokens per target pass and
        per-token acceptance with a speculative mode; the cache hit rate with ssd.
    """
    modes = list(modes)
    spec = [m for m in modes if m != "ar"]
    ssd = [m for m in modes if m == "ssd"]
    panels: list[Panel] = [
        (f"tokens / s ({clock})", modes, "tokens_per_s", "tokens_per_second", None, "{:.1f}")
    ]
    if spec:
        panels.append(
            ("tokens per target pass", modes, "tokens_per_target_pass", "tokens_per_target_pass", None, "{:.2f}")
        )  # fmt: skip
        panels.append(
            ("per-token acceptance (alpha)", spec, "acceptance_per_token", "acceptance_per_token", 1.05, "{:.0%}")
        )  # fmt: skip
    if ssd:
        panels.append(
            ("SSD cache hit rate", ssd, "cache_hit_rate", "cache_hit_rate", 1.05, "{:.0%}")
        )
    return panels


def _plot(
    rows: dict[str, dict[str, float]],
    per_prompt: dict[str, list[Metrics]],
    report: dict[str, Any],
    path: Path,
) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot written")
        return False
    panels = panels_for(list(rows), report["clock"])
    colors = {"ar": "#8c8c8c", "sd": "#4c72b0", "ssd": "#c44e52"}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1, 4.2), squeeze=False)
    for ax, (title, which, pooled, single, ylim, fmt) in zip(axes[0], panels):
        values = [rows[m][pooled] for m in which]
        xs = list(range(len(which)))
        ax.bar(xs, values, width=0.7, color=[colors.get(m, "#55a868") for m in which], alpha=0.8)
        ax.set_xticks(xs, which)
        pad = 0.6 if len(which) > 1 else 1.0
        ax.set_xlim(-pad, len(which) - 1 + pad)
        spread: list[float] = []
        for x, m in enumerate(which):
            # value label on the left half of the bar, one dot per prompt on the right
            ax.text(
                x - 0.17, values[x], fmt.format(values[x]), ha="center", va="bottom", fontsize=8
            )
            pts = [getattr(r, single) for r in per_prompt[m]]
            spread.extend(pts)
            offsets = [0.05 + 0.25 * i / max(len(pts) - 1, 1) for i in range(len(pts))]
            ax.scatter(
                [x + o for o in offsets], pts, s=12, color="black", zorder=3,
                label="one prompt" if x == 0 else None,
            )  # fmt: skip
        top = max([*values, *spread], default=1.0)
        if pooled == "tokens_per_s":
            bound = [
                (x, rows[m]["ssd_bound_tokens_per_s"])
                for x, m in enumerate(which)
                if m != "ar" and rows[m]["ssd_bound_tokens_per_s"] < 3 * max(top, 1e-9)
            ]
            if bound:
                ax.scatter(
                    [b[0] for b in bound], [b[1] for b in bound], marker="_", s=500,
                    color="#2a2a2a", zorder=4, label="ideal SSD bound (E[acc]+1)/T_verify",
                )  # fmt: skip
                top = max(top, *(b[1] for b in bound))
            ax.legend(fontsize=7, loc="upper left")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, ylim if ylim is not None else (top * 1.25 or 1.0))
    fig.suptitle(_title(report), fontsize=8.5)
    fig.text(
        0.01, 0.01,
        "bars: pooled over prompts; dots: one prompt each; alpha and hit rate only where they apply",
        fontsize=7, color="#555555",
    )  # fmt: skip
    fig.tight_layout(rect=(0, 0.04, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- the command --------------------------------------------------------------------------


def run_bench(args: argparse.Namespace) -> int:
    """Run the bench the parsed command line describes; returns the exit code."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        raise ConfigError("--modes needs at least one mode")
    for m in modes:
        if m not in MODES:
            raise UnknownOptionError(
                f"unknown mode {m!r} in --modes; choose from {', '.join(MODES)}"
            )
    sampling, config = check_decode_args(args)
    check_model_args(args, need_draft=any(m != "ar" for m in modes))
    entries = load_prompt_entries(args.prompts)
    if args.limit:
        entries = entries[: args.limit]
    out_dir = check_out_dir(args.out)
    target, draft = load_models(args, need_draft=any(m != "ar" for m in modes), slots=1)
    try:
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
            bar = _Progress(len(prompts), mode)
            results[mode], tokens[mode] = [], []
            try:
                for prompt in prompts:
                    out = generate(
                        target, draft if mode != "ar" else None, prompts=[prompt], mode=mode,
                        max_new_tokens=budget(args, target, len(prompt)), sampling=sampling,
                        config=config, driver=args.driver, seed=args.seed,
                    )  # fmt: skip
                    results[mode].append(out.metrics)
                    tokens[mode].append(out.tokens[0])
                    bar.update()
            finally:
                bar.close()
        rows = {mode: aggregate(ms) for mode, ms in results.items()}
        same = len({json.dumps(t) for t in tokens.values()}) == 1

        for line in _table(rows):
            print(line)
        if args.temperature == 0.0 and len(modes) > 1:
            print(f"greedy outputs identical across modes: {same}")
        print("columns:\n" + LEGEND)

        clock = "simulated clock" if args.driver == "simulated" else "wall clock"
        report = {
            "command": "ssd " + " ".join(sys.argv[1:])
            if sys.argv and "ssd" in Path(sys.argv[0]).name
            else None,
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "processor": platform.processor(),
                "cpus": os.cpu_count(),
            },
            "backend": args.backend,
            "target": getattr(target, "name", "?"),
            "draft": getattr(draft, "name", None),
            "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "k": config.k,
            "fanout": config.fanout,
            "saguaro_c": config.saguaro_c,
            "fallback": config.fallback,
            "temperature": sampling.temperature,
            "driver": args.driver,
            "clock": clock,
            "greedy_identical": same if args.temperature == 0.0 else None,
            "legend": LEGEND,
            "modes": rows,
            "per_prompt": {m: [x.as_dict() for x in ms] for m, ms in results.items()},
        }
        (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
        plotted = _plot(rows, results, report, out_dir / "bench.png")
        print(
            f"wrote {out_dir / 'bench.json'}" + (f" and {out_dir / 'bench.png'}" if plotted else "")
        )
        return 0
    finally:
        free_models(target, draft)
