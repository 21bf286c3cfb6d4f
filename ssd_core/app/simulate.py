"""The ``ssd simulate`` command: Saguaro's knobs on two modelled devices.

Tokens are computed for real by exact reference models (``backends.reference``): a
random n-gram target and a perturbed copy of it as the draft, whose divergence sets the
acceptance rate. Only the clock is modelled: the simulated driver charges every model
call the :class:`~ssd_core.LatencyModel` of a *preset* on a virtual clock per lane, so a
run predicts what a target and a draft on two separate devices would do. It is a model
of two devices, not a measurement of one.

Sweeps (each makes one table section and one figure shaped like the paper's):

* ``modes``    -- AR, SD and SSD with the library's default configuration for each K
  and temperature: SSD/SD and SSD/AR against K.
* ``fanout``   -- cache hit rate against the fan-out per position (uniform lists, and
  the adaptive Thm 12 plan with the same budget).
* ``budget``   -- adaptive vs uniform fan-out of the same budget, and budgets that
  scale with K (``3x`` = 3 (K + 1)) vs fixed ones.
* ``c``        -- Saguaro sampling constant C against SSD/SD and hit rate.
* ``fallback`` -- neural, fast and auto fallback against the batch size.

Only the public API of :mod:`ssd_core` is used, plus the reference backend.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from ssd_core import ConfigError, LatencyModel, Metrics, SamplingParams, SSDConfig, generate

from .common import new_command

__all__ = [
    "PRESETS",
    "SWEEPS",
    "Preset",
    "Setting",
    "add_parser",
    "alpha_from_mean_accepted",
    "build_models",
    "paired_gain",
    "pool",
    "run_setting",
    "run_simulate",
]

log = logging.getLogger("ssd_core.simulate")


@attrs.frozen(kw_only=True)
class Preset:
    """Two modelled devices and a reference model pair standing in for the models.

    Attributes:
        name: what ``--preset`` takes.
        summary: one line: what hardware and models the costs stand for.
        target / draft: the cost of one call on each device.
        vocab_size, order, peakedness: the reference target (a random n-gram model).
        divergence: the draft's logit noise; sets the acceptance rate.
        derivation: where the costs come from (printed by ``--list-presets``).
    """

    name: str
    summary: str
    target: LatencyModel
    draft: LatencyModel
    vocab_size: int = 1024
    order: int = 3
    peakedness: float = 4.0
    divergence: float = 0.27
    derivation: str = ""


def _latency(per_call_ms: float, per_token_ms: float, per_sequence_ms: float = 0.0) -> LatencyModel:
    return LatencyModel(
        per_call=per_call_ms / 1e3,
        per_token=per_token_ms / 1e3,
        per_sequence=per_sequence_ms / 1e3,
        prefill_per_token=per_token_ms / 1e3,
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="paper-llama70b",
            summary="Llama-3.1-70B target on 4xH100 (tensor parallel), Llama-3.2-1B draft on a 5th H100",
            target=_latency(18.0, 0.02),
            draft=_latency(1.8, 0.01),
            divergence=0.27,
            derivation=(
                "Decode is memory-bound: a pass reads every weight once. 70B bf16 weights are "
                "140 GB, 35 GB per GPU at tensor parallel 4; at H100 SXM's 3.35 TB/s that is "
                "10.4 ms at peak bandwidth, ~15-16 ms at the 65-70% real kernels reach, plus "
                "two all-reduces per layer (80 layers) -> ~18 ms, which matches the paper's "
                "AR 54.7 tok/s (18.3 ms a token). The 1B draft's 2.5 GB read in 0.74 ms at "
                "peak; small matrices and 16 layers of launches bring a pass to ~1.8 ms. A "
                "token added to a pass costs little while the pass stays memory-bound: 0.02 ms "
                "(target) and 0.01 ms (draft). Divergence 0.27 is calibrated so that SD/AR at "
                "K = 6, T = 0 is the paper's 2.96 (per-token acceptance ~0.87)."
            ),
        ),
        Preset(
            name="smollm2-cpu",
            summary=(
                "this 2-core machine: SmolLM2-135M fp32 torch target (1 thread) and its "
                "Q4_1 GGUF on llama.cpp as the draft (1 thread), the pair of issue 10"
            ),
            target=_latency(52.0, 5.8),
            draft=_latency(11.0, 6.7),
            divergence=0.2,
            derivation=(
                "Fitted on this machine with scripts/fit_latency.py (least squares of the "
                "thread CPU time of extends on one sequence; target over 1 and 4-8 tokens, "
                "draft over 1-16 tokens; load average 3.4-4 at the time, see "
                "docs/simulation.md). Compute-bound: every token costs 6-7 ms on either "
                "side, so a tree of B branches costs B times a draft token. Divergence 0.2 "
                "gives per-token acceptance ~0.9, the range measured for this pair (0.86-0.97)."
            ),
        ),
    )
}


@attrs.frozen(kw_only=True)
class Setting:
    """One point of a sweep.

    ``fanout=None`` and ``saguaro_c=None`` leave the library's defaults in place; a
    string fan-out ``"Nx"`` is the budget N (K + 1); ``"uN"`` is the uniform list of N
    per position.
    """

    sweep: str
    mode: str
    k: int
    temperature: float
    fanout: int | str | tuple[int, ...] | None = None
    saguaro_c: float | None = None
    fallback: str | None = None
    batch: int = 1
    label: str = ""

    def config(self) -> SSDConfig:
        kw: dict[str, Any] = {"k": self.k}
        fan = resolve_fanout(self.fanout, self.k)
        if fan is not None:
            kw["fanout"] = fan
        if self.saguaro_c is not None:
            kw["saguaro_c"] = self.saguaro_c
        if self.fallback is not None:
            kw["fallback"] = self.fallback
        return SSDConfig(**kw)


def resolve_fanout(
    value: int | str | tuple[int, ...] | None, k: int
) -> int | tuple[int, ...] | None:
    """``"3x"`` -> the budget 3 (K + 1); ``"u3"`` -> (3,) * (K + 1); others unchanged.

    Raises:
        ConfigError: a string that is neither form.
    """
    if value is None or isinstance(value, (int, tuple)):
        return value
    text = value.strip()
    try:
        if text.endswith("x"):
            return int(text[:-1]) * (k + 1)
        if text.startswith("u"):
            return (int(text[1:]),) * (k + 1)
        return int(text)
    except ValueError:
        raise ConfigError(
            f"fan-out {value!r} is not an int budget, 'Nx' (N per position, adaptive) or 'uN' "
            "(uniform N per position)"
        ) from None


def build_models(preset: Preset, *, vocab_size: int | None = None) -> tuple[Any, Any]:
    """The preset's reference target and draft, with its costs attached (never slept)."""
    # The application layer may use in-house backends; only the engine may not.
    from backends.reference import ReferenceModel

    vocab = vocab_size or preset.vocab_size
    target = ReferenceModel.random(
        vocab_size=vocab, order=preset.order, seed=1, peakedness=preset.peakedness,
        latency=preset.target, sleep=False, name=f"{preset.name}-target",
    )  # fmt: skip
    draft = ReferenceModel.perturbed(
        target, divergence=preset.divergence, seed=2, latency=preset.draft, sleep=False,
        name=f"{preset.name}-draft",
    )  # fmt: skip
    return target, draft


def make_prompts(
    count: int, vocab_size: int, *, length: int = 16, seed: int = 0
) -> list[list[int]]:
    """``count`` random prompts of ``length`` token ids, a pure function of the seed."""
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab_size, length)] for _ in range(count)]


def alpha_from_mean_accepted(mean_accepted: float, k: int) -> float:
    """The per-token acceptance ``a`` with ``a (1 - a^K) / (1 - a) = mean_accepted``
    (the mean accepted length of K-token speculations), by bisection."""
    if mean_accepted <= 0.0:
        return 0.0
    if mean_accepted >= k:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        a = (lo + hi) / 2
        if a * (1 - a**k) / (1 - a) < mean_accepted:
            lo = a
        else:
            hi = a
    return (lo + hi) / 2


def _jackknife_se(tokens: Sequence[float], walls: Sequence[float]) -> float:
    """Standard error of sum(tokens) / sum(walls) by leave-one-run-out jackknife."""
    n = len(tokens)
    if n < 2:
        return 0.0
    t, w = sum(tokens), sum(walls)
    loo = [(t - ti) / (w - wi) for ti, wi in zip(tokens, walls) if w - wi > 0]
    if len(loo) < n:
        return 0.0
    mean = sum(loo) / n
    return float(((n - 1) / n * sum((x - mean) ** 2 for x in loo)) ** 0.5)


def paired_gain(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    """Throughput of ``a`` over ``b`` minus 1, and its standard error by a jackknife
    that leaves the same prompt batch out of both (the settings share their prompts)."""
    ra, rb = a["runs"], b["runs"]
    if len(ra) != len(rb):
        raise ConfigError("paired_gain needs two settings run on the same prompt batches")

    def gain(skip: int | None) -> float:
        ta = sum(t for i, (t, _) in enumerate(ra) if i != skip)
        wa = sum(w for i, (_, w) in enumerate(ra) if i != skip)
        tb = sum(t for i, (t, _) in enumerate(rb) if i != skip)
        wb = sum(w for i, (_, w) in enumerate(rb) if i != skip)
        return float((ta / wa) / (tb / wb) - 1.0)

    n = len(ra)
    full = gain(None)
    if n < 2:
        return full, 0.0
    loo = [gain(i) for i in range(n)]
    mean = sum(loo) / n
    return full, float(((n - 1) / n * sum((x - mean) ** 2 for x in loo)) ** 0.5)


def pool(runs: Sequence[Metrics], k: int) -> dict[str, Any]:
    """Pool runs into one set of rates (counts summed, then divided). The standard
    error of the throughput comes from the spread between runs (jackknife)."""

    def total(name: str) -> float:
        return float(sum(getattr(m, name) for m in runs))

    def ratio(num: float, den: float) -> float:
        return num / den if den else 0.0

    wall = total("wall_s")
    mean_acc = ratio(total("accepted_tokens"), total("speculated_rounds"))
    return {
        "tokens": total("generated_tokens"),
        "wall_s": wall,
        "tokens_per_s": ratio(total("generated_tokens"), wall),
        "tokens_per_s_se": _jackknife_se(
            [m.generated_tokens for m in runs], [m.wall_s for m in runs]
        ),
        "accepted_fraction": ratio(total("accepted_tokens"), total("proposed_tokens")),
        "mean_accepted": mean_acc,
        "per_token_acceptance": alpha_from_mean_accepted(mean_acc, k) if k else 0.0,
        "tokens_per_target_pass": ratio(total("generated_tokens"), total("sequence_rounds")),
        "hit_rate": ratio(total("cache_hits"), total("cache_lookups")),
        "target_idle_fraction": ratio(sum(m.target_idle_s for m in runs), wall),
        "draft_busy_fraction": ratio(total("draft_busy_s"), wall),
        "rounds": total("rounds"),
        # Per run (prompt batch): generated tokens and simulated seconds, for paired
        # comparisons between settings run on the same prompts.
        "runs": [[float(m.generated_tokens), float(m.wall_s)] for m in runs],
    }


def run_setting(
    setting: Setting,
    target: Any,
    draft: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    seed: int,
) -> dict[str, Any]:
    """Run ``setting`` on every prompt (in batches of ``setting.batch``) and pool."""
    config = setting.config()
    sampling = SamplingParams(temperature=setting.temperature, ignore_eos=True)
    runs: list[Metrics] = []
    b = setting.batch
    for i in range(0, len(prompts), b):
        chunk = [list(p) for p in prompts[i : i + b]]
        out = generate(
            target, draft if setting.mode != "ar" else None, prompts=chunk, mode=setting.mode,
            max_new_tokens=max_new_tokens, sampling=sampling, config=config,
            driver="simulated", seed=seed + i,
        )  # fmt: skip
        runs.append(out.metrics)
    return pool(runs, setting.k if setting.mode != "ar" else 0)


# -- sweeps ---------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Plan:
    """What a run sweeps over (from the command line)."""

    ks: tuple[int, ...] = (4, 6, 8)
    temperatures: tuple[float, ...] = (0.0, 1.0)
    fanout_k: int = 6
    per_position: tuple[int, ...] = (1, 2, 3, 4, 6)
    budgets: tuple[str, ...] = ("12", "2x", "3x", "4x")
    cs: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    batches: tuple[int, ...] = (1, 2, 4, 8, 16)
    fallbacks: tuple[str, ...] = ("neural", "fast", "auto")
    fallback_temperature: float = 1.0
    #: Knobs for every point that does not sweep them (``None``: the library default).
    fanout: str | None = None
    saguaro_c: float | None = None


def _sweep_modes(plan: Plan) -> list[Setting]:
    knobs = [f"fanout {plan.fanout}" if plan.fanout is not None else "",
             f"C={plan.saguaro_c:g}" if plan.saguaro_c is not None else ""]  # fmt: skip
    label = ", ".join(k for k in knobs if k) or "defaults"
    return [
        Setting(sweep="modes", mode="ssd", k=k, temperature=t, label=label)
        for t in plan.temperatures
        for k in plan.ks
    ]


def _sweep_fanout(plan: Plan) -> list[Setting]:
    k = plan.fanout_k
    out = []
    for t in plan.temperatures:
        for f in plan.per_position:
            out.append(Setting(sweep="fanout", mode="ssd", k=k, temperature=t, fanout=f"u{f}",
                               label=f"uniform {f}/pos"))  # fmt: skip
            out.append(Setting(sweep="fanout", mode="ssd", k=k, temperature=t, fanout=f"{f}x",
                               label=f"adaptive B={f * (k + 1)}"))  # fmt: skip
    return out


def _sweep_budget(plan: Plan) -> list[Setting]:
    out = []
    for t in plan.temperatures:
        for k in plan.ks:
            for b in plan.budgets:
                budget = resolve_fanout(b, k)
                assert isinstance(budget, int)
                per = budget / (k + 1)
                out.append(Setting(sweep="budget", mode="ssd", k=k, temperature=t, fanout=budget,
                                   label=f"adaptive B={b}"))  # fmt: skip
                if per == int(per):
                    out.append(Setting(sweep="budget", mode="ssd", k=k, temperature=t,
                                       fanout=f"u{int(per)}", label=f"uniform B={b}"))  # fmt: skip
                else:
                    base, extra = divmod(budget, k + 1)
                    lst = tuple(base + (1 if j < extra else 0) for j in range(k + 1))
                    out.append(Setting(sweep="budget", mode="ssd", k=k, temperature=t, fanout=lst,
                                       label=f"uniform B={b}"))  # fmt: skip
    return out


def _sweep_c(plan: Plan) -> list[Setting]:
    k = plan.fanout_k
    return [
        Setting(sweep="c", mode="ssd", k=k, temperature=t, saguaro_c=c, label=f"C={c:g}")
        for t in plan.temperatures
        for c in plan.cs
    ]


def _sweep_fallback(plan: Plan) -> list[Setting]:
    k = plan.fanout_k
    t = plan.fallback_temperature
    return [
        Setting(
            sweep="fallback",
            mode="ssd",
            k=k,
            temperature=t,
            fallback=f,
            batch=b,
            label=f"{f} b={b}",
        )  # fmt: skip
        for b in plan.batches
        for f in plan.fallbacks
    ]


SWEEPS: dict[str, Callable[[Plan], list[Setting]]] = {
    "modes": _sweep_modes,
    "fanout": _sweep_fanout,
    "budget": _sweep_budget,
    "c": _sweep_c,
    "fallback": _sweep_fallback,
}


def _with_base(s: Setting, plan: Plan) -> Setting:
    """Fill the knobs a point does not sweep from ``--fanout`` / ``--saguaro-c``."""
    fanout = s.fanout if s.fanout is not None else plan.fanout
    c = s.saguaro_c if s.saguaro_c is not None else plan.saguaro_c
    return attrs.evolve(s, fanout=fanout, saguaro_c=c)


def _baselines(settings: Sequence[Setting]) -> list[Setting]:
    """AR and SD runs every SSD point is compared with (same K, temperature, batch)."""
    seen: dict[tuple[str, int, float, int], Setting] = {}
    for s in settings:
        for mode in ("ar", "sd"):
            k = s.k if mode == "sd" else 0
            key = (mode, k, s.temperature, s.batch)
            if key not in seen:
                seen[key] = Setting(sweep="baseline", mode=mode, k=max(k, 1), temperature=s.temperature,
                                    batch=s.batch, label=mode)  # fmt: skip
    return list(seen.values())


def _baseline_key(mode: str, k: int, temperature: float, batch: int) -> str:
    return f"{mode}/k={k if mode == 'sd' else 0}/T={temperature:g}/b={batch}"


# -- output ---------------------------------------------------------------------------


def _row(p: dict[str, Any]) -> str:
    s, r = p["setting"], p["result"]
    fan = s["fanout"] if s["fanout"] is not None else "default"
    c = s["saguaro_c"] if s["saguaro_c"] is not None else "default"
    fb = s["fallback"] or "default"
    return (
        f"{s['sweep']:8s} {s['label']:22s} {s['k']:>2d} {s['temperature']:>4g} "
        f"{str(fan):>22s} {str(c):>7s} {fb:>7s} {s['batch']:>3d} "
        f"{r['tokens_per_s']:8.1f} {p['ssd_over_sd']:6.3f} {p['ssd_over_ar']:6.3f} "
        f"{r['hit_rate']:6.1%} {r['per_token_acceptance']:6.3f} {r['target_idle_fraction']:6.1%}"
    )


_HEADER = (
    f"{'sweep':8s} {'setting':22s} {'K':>2s} {'T':>4s} {'fanout':>22s} {'C':>7s} {'fallbk':>7s} "
    f"{'b':>3s} {'tok/s':>8s} {'SSD/SD':>6s} {'SSD/AR':>6s} {'hit':>6s} {'alpha':>6s} {'t_idle':>6s}"
)


def _label_points(ax: Any, xs: Sequence[float], ys: Sequence[float], fmt: str) -> None:
    for x, y in zip(xs, ys):
        ax.annotate(format(y, fmt), (x, y), textcoords="offset points", xytext=(0, 5),
                    ha="center", fontsize=7)  # fmt: skip


def _plots(points: list[dict[str, Any]], out_dir: Path, preset: Preset, plan: Plan) -> list[str]:
    """One PNG per sweep present, shaped like the paper's figures. Returns the paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots written")
        return []
    written: list[str] = []
    by: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        by.setdefault(p["setting"]["sweep"], []).append(p)
    sub = f"simulated: {preset.name}"

    def save(fig: Any, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))

    if "modes" in by:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for t in plan.temperatures:
            pts = [p for p in by["modes"] if p["setting"]["temperature"] == t]
            ks = [p["setting"]["k"] for p in pts]
            for ax, key in zip(axes, ("ssd_over_sd", "ssd_over_ar")):
                ys = [p[key] for p in pts]
                ax.plot(ks, ys, marker="o", label=f"T={t:g}")
                _label_points(ax, ks, ys, ".2f")
        knobs = by["modes"][0]["setting"]["label"]
        axes[0].set_title(f"SSD / SD vs K ({knobs}; {sub})")
        axes[0].set_ylabel("SSD / SD throughput")
        axes[1].set_title(f"SSD / AR vs K ({knobs})")
        axes[1].set_ylabel("SSD / AR throughput")
        for ax in axes:
            ax.set_xlabel("speculation length K")
            ax.legend()
            ax.grid(alpha=0.3)
        save(fig, "speedup_vs_k.png")

    if "fanout" in by:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for t in plan.temperatures:
            for kind, style in (("uniform", "-"), ("adaptive", "--")):
                pts = [
                    p for p in by["fanout"]
                    if p["setting"]["temperature"] == t and p["setting"]["label"].startswith(kind)
                ]  # fmt: skip
                xs = [_per_position(p["setting"]) for p in pts]
                ys = [p["result"]["hit_rate"] for p in pts]
                ax.plot(xs, ys, style, marker="o", label=f"{kind}, T={t:g}")
                _label_points(ax, xs, ys, ".2f")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"fan-out per position (budget / (K+1)), K={plan.fanout_k}")
        ax.set_ylabel("cache hit rate")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"Fan-out vs cache hit rate ({sub})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "fanout_vs_hit_rate.png")

    if "budget" in by:
        fig, axes = plt.subplots(1, len(plan.temperatures), figsize=(5 * len(plan.temperatures), 3.8),
                                 squeeze=False)  # fmt: skip
        for ax, t in zip(axes[0], plan.temperatures):
            labels = list(dict.fromkeys(p["setting"]["label"] for p in by["budget"]))
            width = 0.8 / max(len(labels), 1)
            for i, lab in enumerate(labels):
                pts = [p for p in by["budget"] if p["setting"]["label"] == lab
                       and p["setting"]["temperature"] == t]  # fmt: skip
                xs = [p["setting"]["k"] + (i - len(labels) / 2 + 0.5) * width for p in pts]
                ys = [p["ssd_over_sd"] for p in pts]
                ax.bar(xs, ys, width=width, label=lab)
                for x, y in zip(xs, ys):
                    ax.annotate(
                        f"{y:.2f}", (x, y), ha="center", va="bottom", fontsize=6, rotation=90
                    )
            ax.set_xticks(list(plan.ks))
            ax.set_xlabel("speculation length K")
            ax.set_ylabel("SSD / SD throughput")
            lo = min(p["ssd_over_sd"] for p in by["budget"])
            ax.set_ylim(max(0.0, lo - 0.15), None)
            ax.set_title(f"Budget and plan, T={t:g} ({preset.name})")
            ax.legend(fontsize=6, ncol=2)
        save(fig, "budget.png")

    if "c" in by:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for t in plan.temperatures:
            pts = [p for p in by["c"] if p["setting"]["temperature"] == t]
            cs = [p["setting"]["saguaro_c"] for p in pts]
            for ax, ys, fmt in (
                (axes[0], [p["ssd_over_sd"] for p in pts], ".2f"),
                (axes[1], [p["result"]["hit_rate"] for p in pts], ".2f"),
            ):
                ax.plot(cs, ys, marker="o", label=f"T={t:g}")
                _label_points(ax, cs, ys, fmt)
        axes[0].set_ylabel("SSD / SD throughput")
        axes[0].set_title(f"Saguaro sampling C sweep, K={plan.fanout_k} ({sub})")
        axes[1].set_ylabel("cache hit rate")
        axes[1].set_title("Cache hit rate vs C")
        for ax in axes:
            ax.set_xlabel("Saguaro constant C (1 = plain sampling)")
            ax.legend()
            ax.grid(alpha=0.3)
        save(fig, "c_sweep.png")

    if "fallback" in by:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for f in plan.fallbacks:
            pts = [p for p in by["fallback"] if p["setting"]["fallback"] == f]
            bs = [p["setting"]["batch"] for p in pts]
            ys = [p["ssd_over_sd"] for p in pts]
            ax.plot(bs, ys, marker="o", label=f"{f} fallback")
            _label_points(ax, bs, ys, ".2f")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("SSD / SD throughput")
        ax.set_title(
            f"Fallback vs batch size, K={plan.fanout_k}, T={plan.fallback_temperature:g} ({sub})"
        )
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, "fallback_vs_batch.png")
    return written


def _per_position(setting: dict[str, Any]) -> float:
    fan = setting["fanout"]
    k = int(setting["k"])
    resolved = resolve_fanout(fan if not isinstance(fan, list) else tuple(fan), k)
    total: int = resolved if isinstance(resolved, int) else sum(resolved or ())
    return total / (k + 1)


# -- the command ----------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of numbers, got {text!r}"
        ) from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of ints, got {text!r}") from None


def _words(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``ssd simulate`` on the CLI's subparsers."""
    p = new_command(
        sub,
        "simulate",
        help="predict AR/SD/SSD throughput on two modelled devices; sweeps, table, JSON, plots",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.set_defaults(func=run_simulate)
    p.add_argument("--preset", default="paper-llama70b", help="latency preset (see --list-presets)")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument(
        "--sweeps", type=_words, default=tuple(SWEEPS), help="comma list of: " + ", ".join(SWEEPS)
    )
    p.add_argument("--ks", type=_ints, default=None, help="K values (default 4,6,8)")
    p.add_argument("--temperatures", type=_floats, default=None, help="default 0,1")
    p.add_argument(
        "--fanout-k", type=int, default=None, help="K for the fanout, c and fallback sweeps (6)"
    )
    p.add_argument(
        "--per-position", type=_ints, default=None, help="fan-outs per position (1,2,3,4,6)"
    )
    p.add_argument("--budgets", type=_words, default=None,
                   help="budgets: an int, or Nx = N (K+1) (default 12,2x,3x,4x)")  # fmt: skip
    p.add_argument("--cs", type=_floats, default=None, help="Saguaro C values (0.5..1.0)")
    p.add_argument("--batches", type=_ints, default=None, help="batch sizes (1,2,4,8,16)")
    p.add_argument("--fallbacks", type=_words, default=None, help="neural,fast,auto")
    p.add_argument("--fallback-temperature", type=float, default=None, help="default 1")
    p.add_argument("--fanout", default=None,
                   help="fan-out for points that do not sweep it: an int budget, Nx = N (K+1) "
                   "(adaptive) or uN (uniform N per position); default: the library's")  # fmt: skip
    p.add_argument("--saguaro-c", type=float, default=None,
                   help="Saguaro C for points that do not sweep it; default: the library's")  # fmt: skip
    p.add_argument("--prompts", type=int, default=8, help="prompts per point (pooled)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary")
    p.add_argument("--divergence", type=float, default=None, help="override the draft divergence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="simulate-out", help="folder for simulate.json and the PNGs")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings (2 prompts, 24 tokens, vocab 128, K=3, few points) for tests")  # fmt: skip
    return p


def _plan_from(args: argparse.Namespace) -> Plan:
    base = (
        Plan(
            ks=(3,),
            fanout_k=3,
            per_position=(1, 3),
            budgets=("8", "3x"),
            cs=(0.7, 1.0),
            batches=(1, 2),
            fallbacks=("neural", "fast"),
        )  # fmt: skip
        if args.quick
        else Plan()
    )
    changes: dict[str, Any] = {}
    for name in ("ks", "temperatures", "fanout_k", "per_position", "budgets", "cs", "batches",
                 "fallbacks", "fallback_temperature", "fanout", "saguaro_c"):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    plan = attrs.evolve(base, **changes)
    for f in plan.fallbacks:
        if f not in ("neural", "fast", "auto"):
            raise ConfigError(f"unknown fallback {f!r}; choose from neural, fast, auto")
    for name in ("ks", "temperatures", "per_position", "cs", "batches"):
        if not getattr(plan, name):
            raise ConfigError(f"--{name.replace('_', '-')} needs at least one value")
    if any(k < 1 for k in (*plan.ks, plan.fanout_k)):
        raise ConfigError("K values must be >= 1")
    if any(b < 1 for b in plan.batches):
        raise ConfigError("batch sizes must be >= 1")
    for b in (*plan.budgets, *([plan.fanout] if plan.fanout is not None else [])):
        resolve_fanout(b, 1)
    return plan


def run_simulate(args: argparse.Namespace) -> int:
    """Run the sweeps the parsed command line asks for; returns the exit code."""
    if args.list_presets:
        for p in PRESETS.values():
            print(f"{p.name}: {p.summary}")
            print(f"  target {p.target}\n  draft  {p.draft}\n  divergence {p.divergence}")
            print(f"  {p.derivation}")
        return 0
    if args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    unknown = [s for s in args.sweeps if s not in SWEEPS]
    if unknown:
        raise ConfigError(f"unknown sweep(s) {', '.join(unknown)}; choose from {', '.join(SWEEPS)}")
    preset = PRESETS[args.preset]
    if args.divergence is not None:
        preset = attrs.evolve(preset, divergence=args.divergence)
    plan = _plan_from(args)
    prompts_n = 2 if args.quick and args.prompts == 8 else args.prompts
    max_new = 24 if args.quick and args.max_new_tokens == 256 else args.max_new_tokens
    vocab = args.vocab or (128 if args.quick else preset.vocab_size)
    if prompts_n < 1 or max_new < 1:
        raise ConfigError("--prompts and --max-new-tokens must be >= 1")

    settings = [_with_base(s, plan) for name in args.sweeps for s in SWEEPS[name](plan)]
    # Fail on a bad knob before any work.
    for s in settings:
        s.config()
    target, draft = build_models(preset, vocab_size=vocab)
    # Every point runs whole batches: ceil(prompts / batch) of them.
    most = max(-(-prompts_n // s.batch) * s.batch for s in settings) if settings else prompts_n
    all_prompts = make_prompts(most, vocab, seed=args.seed)

    def prompts_for(s: Setting) -> list[list[int]]:
        return all_prompts[: -(-prompts_n // s.batch) * s.batch]

    t0 = time.perf_counter()
    baselines: dict[str, dict[str, Any]] = {}
    for s in _baselines(settings):
        baselines[_baseline_key(s.mode, s.k, s.temperature, s.batch)] = run_setting(
            s, target, draft, prompts_for(s), max_new_tokens=max_new, seed=args.seed
        )
    points: list[dict[str, Any]] = []
    print(_HEADER)
    for s in settings:
        r = run_setting(s, target, draft, prompts_for(s), max_new_tokens=max_new, seed=args.seed)
        sd = baselines[_baseline_key("sd", s.k, s.temperature, s.batch)]
        ar = baselines[_baseline_key("ar", s.k, s.temperature, s.batch)]
        point = {
            "setting": attrs.asdict(s),
            "config": {
                "fanout": s.config().fanout,
                "saguaro_c": s.config().saguaro_c,
                "fallback": s.config().fallback,
            },
            "prompts": len(prompts_for(s)),
            "result": r,
            "ssd_over_sd": r["tokens_per_s"] / sd["tokens_per_s"] if sd["tokens_per_s"] else 0.0,
            "ssd_over_ar": r["tokens_per_s"] / ar["tokens_per_s"] if ar["tokens_per_s"] else 0.0,
            "sd_over_ar": sd["tokens_per_s"] / ar["tokens_per_s"] if ar["tokens_per_s"] else 0.0,
        }
        points.append(point)
        print(_row(point), flush=True)
    elapsed = time.perf_counter() - t0

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = _plots(points, out_dir, preset, plan)
    report = {
        "command": "ssd " + " ".join(sys.argv[1:])
        if Path(sys.argv[0]).name in ("ssd", "cli.py")
        else None,
        "arguments": {k: v for k, v in vars(args).items() if k not in ("command", "func")},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg": _loadavg(),
        "host_seconds": elapsed,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "preset": {
            "name": preset.name,
            "summary": preset.summary,
            "target": attrs.asdict(preset.target),
            "draft": attrs.asdict(preset.draft),
            "vocab_size": vocab,
            "order": preset.order,
            "peakedness": preset.peakedness,
            "divergence": preset.divergence,
            "derivation": preset.derivation,
        },
        "defaults": {
            "fanout_by_k": {str(k): SSDConfig(k=k).fanout for k in plan.ks},
            "saguaro_c": SSDConfig().saguaro_c,
            "fallback": SSDConfig().fallback,
        },
        "plan": attrs.asdict(plan),
        "prompts": prompts_n,
        "max_new_tokens": max_new,
        "seed": args.seed,
        "baselines": baselines,
        "points": points,
        "figures": figures,
    }
    (out_dir / "simulate.json").write_text(json.dumps(report, indent=2, default=_jsonable))
    print(
        f"wrote {out_dir / 'simulate.json'}" + (f" and {len(figures)} plot(s)" if figures else "")
    )
    return 0


def _jsonable(x: Any) -> Any:
    if isinstance(x, tuple):
        return list(x)
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    raise TypeError(f"cannot serialise {type(x).__name__}")


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in os.getloadavg()]
    except OSError:
        return None
