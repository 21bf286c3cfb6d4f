"""One GPU check: AR vs SD vs SSD on an 8B/1B-shaped Llama pair, built on the device.

For a person with ~15 minutes on a fresh GPU machine without network. It needs torch
(with CUDA) and what ``ssd_core`` needs: numpy, attrs, array-api-compat -- nothing else
(no transformers, no model download: the models are random-weight Llama-3.1-8B- and
Llama-3.2-1B-shaped :class:`backends.torch.PlainLlama`, built directly on the GPU;
decoding speed does not depend on the weights' values). If a package is missing it says
what to ``pip install --no-index --find-links WHEELS`` (about 17 MB of wheels in all).

What it does, in order (each step is timed against ``--budget-s``):

1. builds the pair in float32 with TF32 off (greedy identity must hold exactly);
2. for each batch size and each mode -- AR, SD, SSD (sequential driver) and SSD
   (threaded driver, draft and target on their own streams) -- one warm-up run, then
   ``--reps`` timed runs: tokens/s, per-call CUDA-event timings per lane, lane overlap
   (fraction of the shorter lane's busy time during which the other lane was busy too),
   peak memory;
3. one counting run per mode and batch (sequential driver): host syncs per round (calls
   that block the host on a CUDA tensor, :func:`backends.torch.count_host_syncs`, with
   the top call sites) and bytes copied per round (:func:`backends.torch.count_copies`
   plus the backend's own KV counters);
4. greedy identity: every mode's tokens == AR's, at every batch size;
5. the acceptance upper bound: SD and SSD with the 8B model as its own draft (acceptance
   1: random weights give a 1B draft near-zero acceptance, the lower bound);
6. a prediction at realistic acceptance: the per-call costs measured in step 2, fitted
   as ``ms = a + b * tokens`` per lane, charged by the simulated driver to a reference
   pair with acceptance ~0.87 (DESIGN section 6);
7. if onnxruntime and onnx are installed, the onnxruntime backend on CUDA: a small
   exported Llama pair, CUDA vs CPU logits, extend-in-pieces and batched vs fresh
   prefill on the device, greedy AR == SD == SSD, tokens/s and the KV copy counters;
8. writes ``gpu_check.json`` and ``gpu_check.png`` to ``--out``.

Usage::

    PYTHONPATH=. python scripts/gpu_check.py --out gpu_report          # on the GPU box
    PYTHONPATH=. python scripts/gpu_check.py --dry-run --out /tmp/gc   # CPU, tiny, < 1 min

Exit status: 0 all checks passed, 1 a check failed (greedy identity), 3 a package is
missing, 4 no CUDA device (without ``--dry-run``).

Every run proposes K tokens a round (``SSDConfig(adaptive=False)``): the check exercises
the device paths, not the speculation policy, which would rightly skip drafting with the
tiny models of ``--dry-run``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import statistics
import struct
import sys
import time
import zlib
from typing import Any

log = logging.getLogger("gpu_check")

#: What ``import ssd_core`` and this script need besides torch (pip name, module, wheel MB).
NEEDS = (
    ("numpy", "numpy", 16.5),
    ("attrs", "attrs", 0.1),
    ("array-api-compat", "array_api_compat", 0.1),
)


def preflight() -> list[str]:
    """The pip names of missing packages (torch included)."""
    missing = []
    for pip, module, _ in (("torch", "torch", 0.0), *NEEDS):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(pip)
    return missing


def explain_missing(missing: list[str]) -> str:
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    names = " ".join(missing)
    size = sum(mb for pip, _, mb in NEEDS if pip in missing)
    return (
        f"missing packages: {', '.join(missing)}\n"
        f"On a machine with network, fetch the wheels (~{size:.0f} MB):\n"
        f"  pip download -d wheels --only-binary=:all: --python-version {py} "
        f"--platform manylinux2014_x86_64 {names}\n"
        f"copy the folder over, then here:\n"
        f"  pip install --no-index --find-links wheels {names}\n"
        "(torch itself must come with the machine's CUDA build.)"
    )


# -- measuring -----------------------------------------------------------------------


class Env:
    """Device plumbing that works the same on CUDA and (dry run) on CPU."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def reference(self) -> Any:
        """A time origin for call intervals: a CUDA event, or perf_counter on CPU."""
        if self.cuda:
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record(self.torch.cuda.current_stream(self.device))
            return ev
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated(self.device) / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def overlap_fraction(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Time both lanes were busy, over the shorter lane's busy time (0 when idle)."""
    ua, ub = union(a), union(b)
    both, i, j = 0.0, 0, 0
    while i < len(ua) and j < len(ub):
        lo, hi = max(ua[i][0], ub[j][0]), min(ua[i][1], ub[j][1])
        both += max(0.0, hi - lo)
        if ua[i][1] < ub[j][1]:
            i += 1
        else:
            j += 1
    busy = min(sum(y - x for x, y in ua), sum(y - x for x, y in ub))
    return both / busy if busy > 0 else 0.0


def call_summary(calls: list[dict[str, float]]) -> dict[str, Any]:
    """Per-call timings grouped by tokens per call."""
    groups: dict[int, list[float]] = {}
    for c in calls:
        groups.setdefault(int(c["tokens"]), []).append(c["ms"])
    return {
        "calls": len(calls),
        "busy_ms": sum(c["ms"] for c in calls),
        "by_tokens": {
            str(t): {"n": len(v), "median_ms": statistics.median(v), "max_ms": max(v)}
            for t, v in sorted(groups.items())
        },
    }


def fit_latency(calls: list[dict[str, float]]) -> tuple[float, float]:
    """Least-squares ``ms = a + b * tokens`` over the calls (b >= 0)."""
    xs = [c["tokens"] for c in calls]
    ys = [c["ms"] for c in calls]
    if not calls:
        return 0.0, 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = (
        max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var)
        if var
        else 0.0
    )
    return max(0.0, my - b * mx), b


# -- the check ------------------------------------------------------------------------


MODES = (("ar", "sequential"), ("sd", "sequential"), ("ssd", "sequential"), ("ssd", "threaded"))


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from backends.torch import LLAMA_1B, LLAMA_8B, LlamaShape

        self.args = args
        self.torch = torch
        self.t0 = time.perf_counter()
        self.skipped: list[str] = []
        self.failures: list[str] = []
        if args.dry_run:
            self.env = Env("cpu")
            self.target_shape = LlamaShape(
                vocab_size=512,
                hidden_size=64,
                intermediate_size=128,
                num_layers=2,
                num_heads=4,
                num_kv_heads=2,
                head_dim=16,
                context_size=1024,
            )
            self.draft_shape = LlamaShape(
                vocab_size=512,
                hidden_size=32,
                intermediate_size=64,
                num_layers=1,
                num_heads=4,
                num_kv_heads=2,
                head_dim=8,
                context_size=1024,
            )
            torch.set_num_threads(1)
        else:
            self.env = Env(args.device)
            self.target_shape, self.draft_shape = LLAMA_8B, LLAMA_1B
        if self.env.cuda:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def build(self) -> None:
        from backends.torch import PlainLlama, TorchModel

        dtype = getattr(self.torch, self.args.dtype)
        t = time.perf_counter()
        kv = self.args.kv_tokens
        self.target_net = PlainLlama(self.target_shape, device=self.env.device, dtype=dtype, seed=1)
        self.draft_net = PlainLlama(self.draft_shape, device=self.env.device, dtype=dtype, seed=2)
        self.target = TorchModel.from_module(
            self.target_net, name="target-8b", timing=True, kv_tokens=kv
        )
        self.draft = TorchModel.from_module(
            self.draft_net, name="draft-1b", timing=True, kv_tokens=kv
        )
        self.env.sync()
        self.build_s = time.perf_counter() - t
        gen = self.torch.Generator().manual_seed(0)
        vocab = self.target_shape.vocab_size
        self.prompts = {
            b: [
                self.torch.randint(0, vocab, (self.args.prompt,), generator=gen).tolist()
                for _ in range(b)
            ]
            for b in self.args.batches
        }
        log.info(
            "built target %s and draft %s on %s in %.1f s",
            self.target_shape,
            self.draft_shape,
            self.env.device,
            self.build_s,
        )

    def generate(self, mode: str, driver: str, batch: int, tokens: int, draft: Any = None) -> Any:
        from ssd_core import SamplingParams, SSDConfig, generate

        return generate(
            self.target,
            draft or self.draft,
            prompts=self.prompts[batch],
            mode=mode,
            max_new_tokens=tokens,
            sampling=SamplingParams(temperature=0.0),
            config=SSDConfig(k=self.args.k, fanout=self.args.fanout, adaptive=False),
            driver=driver,
            seed=0,
        )

    def run_here(self, mode: str, batch: int, tokens: int) -> Any:
        """Like :meth:`generate` with the sequential driver, every backend call in this
        thread (the sync counters count per thread); returns the metrics."""
        from ssd_core import Engine, SamplingParams, SSDConfig

        engine = Engine(
            self.target, self.draft, mode=mode,
            config=SSDConfig(k=self.args.k, fanout=self.args.fanout, adaptive=False),
            driver="sequential", own_thread=False,
        )  # fmt: skip
        engine.submit_many(
            self.prompts[batch], sampling=SamplingParams(temperature=0.0),
            max_new_tokens=tokens, seed=0,
        )  # fmt: skip
        engine.run_here()
        return engine.metrics()

    def timed(
        self, mode: str, driver: str, batch: int, draft: Any = None, reps: int | None = None
    ) -> dict[str, Any]:
        draft = draft or self.draft
        self.generate(mode, driver, batch, min(8, self.args.tokens), draft)  # warm-up
        runs = []
        for _ in range(reps or self.args.reps):
            for m in (self.target, draft):
                m.clear_timings()
            self.env.sync()
            self.env.reset_peak()
            ref = self.env.reference()
            t = time.perf_counter()
            res = self.generate(mode, driver, batch, self.args.tokens, draft)
            self.env.sync()
            wall = time.perf_counter() - t
            tcalls = self.target.call_timings(ref)
            dcalls = draft.call_timings(ref) if draft is not self.target else []
            generated = sum(len(x) for x in res.tokens)
            m = res.metrics
            runs.append(
                {
                    "wall_s": wall,
                    "tokens_per_s": generated / wall,
                    "generated": generated,
                    "rounds": m.rounds,
                    "acceptance_per_token": m.acceptance_per_token,
                    "cache_hit_rate": m.cache_hit_rate if mode == "ssd" else None,
                    "peak_mib": self.env.peak_mib(),
                    "lane_overlap": overlap_fraction(
                        [(c["start_ms"], c["end_ms"]) for c in tcalls],
                        [(c["start_ms"], c["end_ms"]) for c in dcalls],
                    )
                    if dcalls
                    else 0.0,
                    "target_calls": call_summary(tcalls),
                    "draft_calls": call_summary(dcalls),
                    "tokens": [list(x) for x in res.tokens],
                    "_calls": (tcalls, dcalls),
                }
            )
        best = max(runs, key=lambda r: r["tokens_per_s"])
        return {
            "mode": mode,
            "driver": driver,
            "batch": batch,
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in runs),
            "tokens_per_s_all": [r["tokens_per_s"] for r in runs],
            "runs": runs,
            "best": best,
        }

    def counted(self, mode: str, driver: str, batch: int) -> dict[str, Any]:
        from backends.torch import count_copies, count_host_syncs

        tokens = min(self.args.tokens, self.args.count_tokens)
        for m in (self.target, self.draft):
            m.stats.reset()
        with (
            count_host_syncs(simulate=not self.env.cuda, sites=True) as syncs,
            count_copies() as copies,
        ):
            metrics = self.run_here(mode, batch, tokens)
        rounds = max(1, metrics.rounds)
        stats = {
            name: {k: v / rounds for k, v in m.stats.as_dict().items()}
            for name, m in (("target", self.target), ("draft", self.draft))
        }
        return {
            "mode": mode,
            "batch": batch,
            "rounds": rounds,
            "simulated_device": not self.env.cuda,
            "host_syncs_per_round": syncs.total / rounds,
            "host_syncs_by_kind_per_round": {k: v / rounds for k, v in syncs.by_kind.most_common()},
            "host_sync_top_sites": dict(syncs.sites.most_common(10)),
            "bytes_copied_per_round": copies.total / rounds,
            "bytes_copied_by_op_per_round": {k: v / rounds for k, v in copies.by_op.most_common()},
            "backend_stats_per_round": stats,
        }

    def simulate(self, lat: dict[str, tuple[float, float]]) -> dict[str, Any]:
        """Predicted tok/s at realistic acceptance from the measured per-call costs."""
        from backends.reference import ReferenceModel
        from ssd_core import LatencyModel, SamplingParams, SSDConfig, generate

        def model(lane: str) -> LatencyModel:
            a, b = lat[lane]
            return LatencyModel(per_call=a / 1e3, per_token=b / 1e3, prefill_per_token=b / 1e3)

        target = ReferenceModel.random(
            vocab_size=1024, order=3, seed=1, peakedness=4.0, latency=model("target"), sleep=False
        )
        draft = ReferenceModel.perturbed(
            target, divergence=0.3, seed=2, latency=model("draft"), sleep=False
        )
        out = {}
        for mode in ("ar", "sd", "ssd"):
            r = generate(
                target,
                draft,
                prompts=[[1, 2, 3]],
                mode=mode,
                max_new_tokens=256,
                sampling=SamplingParams(temperature=0.0),
                config=SSDConfig(k=self.args.k, fanout=self.args.fanout, adaptive=False),
                driver="simulated",
                seed=0,
            )
            out[mode] = {
                "tokens_per_s": r.metrics.tokens_per_second,
                "acceptance_per_token": r.metrics.acceptance_per_token,
            }
        return out

    def run(self) -> dict[str, Any]:
        report: dict[str, Any] = {"environment": environment(self.env), "args": vars(self.args)}
        self.build()
        report["models"] = {
            "target": {**_shape_dict(self.target_shape), "build_s": self.build_s},
            "draft": _shape_dict(self.draft_shape),
            "dtype": self.args.dtype,
            "tf32": False,
        }
        timed, counts = [], []
        for batch in self.args.batches:
            for mode, driver in MODES:
                if self.left() < 0:
                    self.skipped.append(f"timed {mode}/{driver} batch {batch}")
                    continue
                r = self.timed(mode, driver, batch)
                timed.append(r)
                log.info(
                    "%-3s %-10s B=%d  %8.1f tok/s  (reps %s)  overlap %.2f  peak %.0f MiB",
                    mode,
                    driver,
                    batch,
                    r["tokens_per_s_median"],
                    ", ".join(f"{x:.1f}" for x in r["tokens_per_s_all"]),
                    r["best"]["lane_overlap"],
                    r["best"]["peak_mib"],
                )
        for batch in self.args.batches:
            for mode in ("ar", "sd", "ssd"):
                if self.left() < 0:
                    self.skipped.append(f"counting {mode} batch {batch}")
                    continue
                c = self.counted(mode, "sequential", batch)
                counts.append(c)
                log.info(
                    "%-3s B=%d  host syncs/round %6.1f   bytes copied/round %10.0f",
                    mode,
                    batch,
                    c["host_syncs_per_round"],
                    c["bytes_copied_per_round"],
                )
        # greedy identity: every mode's tokens equal AR's at the same batch size
        identity = {}
        for batch in self.args.batches:
            ar = next((r for r in timed if r["batch"] == batch and r["mode"] == "ar"), None)
            for r in timed:
                if ar is None or r["batch"] != batch or r is ar:
                    continue
                key = f"{r['mode']}/{r['driver']}/B{batch}"
                same = all(run["tokens"] == ar["runs"][0]["tokens"] for run in r["runs"])
                identity[key] = same
                if not same:
                    self.failures.append(f"greedy identity {key}")
        report["greedy_identity"] = identity
        upper = []
        if self.args.upper_bound and self.left() > 0:
            from backends.torch import TorchModel

            twin = TorchModel.from_module(
                self.target_net, name="target-as-draft", timing=True, kv_tokens=self.args.kv_tokens
            )
            for mode, driver in (("sd", "sequential"), ("ssd", "threaded")):
                r = self.timed(mode, driver, self.args.batches[0], draft=twin, reps=1)
                upper.append(r)
                log.info(
                    "upper bound (draft = target) %-3s %-10s %8.1f tok/s  acceptance %.2f",
                    mode,
                    driver,
                    r["tokens_per_s_median"],
                    r["best"]["acceptance_per_token"],
                )
        elif self.args.upper_bound:
            self.skipped.append("upper bound")
        lat = {}
        for lane, idx in (("target", 0), ("draft", 1)):
            calls = [
                c
                for r in timed
                if r["batch"] == self.args.batches[0]
                for c in r["best"]["_calls"][idx]
            ]
            lat[lane] = fit_latency(calls)
        report["fitted_latency_ms"] = {
            k: {"per_call": a, "per_token": b} for k, (a, b) in lat.items()
        }
        report["simulated"] = self.simulate(lat) if self.left() > 0 else None
        if self.args.onnxruntime and self.left() > 0:
            report["onnxruntime"] = onnxruntime_check(self.args, self.failures)
            log.info(
                "onnxruntime: %s", {k: v for k, v in report["onnxruntime"].items() if k != "modes"}
            )
        elif self.args.onnxruntime:
            self.skipped.append("onnxruntime")
        for r in timed + upper:
            for run in r["runs"]:
                run.pop("_calls", None)
                run.pop("tokens", None)
            r.pop("best", None)
        report["timed"] = timed
        report["counted"] = counts
        report["upper_bound"] = upper
        report["skipped"] = self.skipped
        report["failures"] = self.failures
        report["elapsed_s"] = time.perf_counter() - self.t0
        return report


def onnxruntime_check(args: argparse.Namespace, failures: list[str]) -> dict[str, Any]:
    """The onnxruntime backend on the device (CPU provider, torch CPU buffers, dry run)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as exc:
        return {"skipped": f"not installed: {exc.name}"}
    import tempfile

    import numpy as np

    from backends.onnxruntime import CPU, CUDA, OrtModel, export_tiny_llama
    from ssd_core import SamplingParams, SSDConfig, generate

    small = dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        context_size=1024,
        seed=1,
    )
    if args.dry_run:
        small.update(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
        )
    draft_shape = dict(
        small,
        hidden_size=small["hidden_size"] // 4,
        num_layers=1,
        intermediate_size=small["intermediate_size"] // 4,
        num_heads=2,
        num_kv_heads=1,
        seed=2,
    )
    out: dict[str, Any] = {"providers": onnxruntime.get_available_providers()}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tpath = export_tiny_llama(os.path.join(tmp, "t.onnx"), name="target", **small)
        dpath = export_tiny_llama(os.path.join(tmp, "d.onnx"), name="draft", **draft_shape)
        out["export_s"] = time.perf_counter() - t0
        kw: dict[str, Any] = {"io_binding": True, "kv_on_device": True} if args.dry_run else {}
        dev = OrtModel.from_file(tpath, providers=[CPU] if args.dry_run else None, **kw)
        out.update(
            provider=dev.provider,
            fell_back=dev.providers.fell_back,
            io_binding=dev.io_binding,
            kv_on_device=dev.kv_on_device,
        )
        if dev.provider != CUDA and not args.dry_run:
            failures.append("onnxruntime: the CUDA provider did not load")
            out["skipped"] = "CUDA provider did not load (CUDA/cuDNN libraries missing?)"
            return out
        cpu = OrtModel.from_file(tpath, providers=[CPU])

        def fresh(model: Any, toks: list[int]) -> np.ndarray:
            h = model.open([])
            try:
                return np.asarray(_host(model.extend([(h, toks)])))
            finally:
                model.close(h)

        rng = np.random.default_rng(0)
        toks = rng.integers(0, small["vocab_size"], 200 if not args.dry_run else 60).tolist()
        g, c = fresh(dev, toks), fresh(cpu, toks)
        out["device_vs_cpu_max_abs_diff"] = float(np.abs(g - c).max())
        out["device_vs_cpu_top1_agreement"] = float((g.argmax(-1) == c.argmax(-1)).mean())
        if out["device_vs_cpu_max_abs_diff"] > 1e-2:
            failures.append("onnxruntime: device logits differ from CPU logits")
        h = dev.open(toks[:30])
        part = _host(dev.extend([(h, toks[30:40])]))
        kid = dev.fork(h, 35)
        dev.truncate(h, 32)
        hs = [dev.open(toks[:20]), h, kid]
        batch = _host(dev.extend([(x, [7]) for x in hs]))
        want = np.concatenate([fresh(dev, toks[:n] + [7])[-1:] for n in (20, 32, 35)])
        out["pieces_vs_fresh"] = float(np.abs(np.asarray(part) - fresh(dev, toks[:40])[30:]).max())
        out["batched_vs_fresh"] = float(np.abs(np.asarray(batch) - want).max())
        for name in ("pieces_vs_fresh", "batched_vs_fresh"):
            if out[name] > 1e-3:
                failures.append(f"onnxruntime: {name} {out[name]:.2e}")
        for x in hs:
            dev.close(x)
        draft = OrtModel.from_file(dpath, providers=[CPU] if args.dry_run else None, **kw)
        prompts = [toks[:16], toks[16:24]]
        ar_tokens, modes = None, {}
        for mode in ("ar", "sd", "ssd"):
            generate(
                dev,
                draft,
                prompts=prompts,
                mode=mode,
                max_new_tokens=8,
                sampling=SamplingParams(temperature=0.0),
                config=SSDConfig(k=4, adaptive=False),
            )  # warm-up
            dev.stats.clear()
            t = time.perf_counter()
            res = generate(
                dev,
                draft,
                prompts=prompts,
                mode=mode,
                max_new_tokens=args.tokens,
                sampling=SamplingParams(temperature=0.0),
                config=SSDConfig(k=4, adaptive=False),
            )
            wall = time.perf_counter() - t
            ar_tokens = ar_tokens or res.tokens
            modes[mode] = {
                "tokens_per_s": sum(map(len, res.tokens)) / wall,
                "greedy_identical": res.tokens == ar_tokens,
                "target_stats_per_round": {
                    k: v / max(1, res.metrics.rounds) for k, v in dev.stats.items()
                },
            }
            if res.tokens != ar_tokens:
                failures.append(f"onnxruntime: greedy {mode} != ar")
        out["modes"] = modes
    return out


def _host(x: Any) -> Any:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


def _shape_dict(shape: Any) -> dict[str, Any]:
    import attrs

    return {**attrs.asdict(shape), "parameters": shape.parameters()}


def environment(env: Env) -> dict[str, Any]:
    torch = env.torch
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(env.device),
        "platform": platform.platform(),
    }
    if env.cuda:
        props = torch.cuda.get_device_properties(env.device)
        out.update(
            gpu=props.name,
            gpu_memory_gib=props.total_memory / 2**30,
            cuda=torch.version.cuda,
            device_count=torch.cuda.device_count(),
        )
    return out


# -- the picture (no matplotlib needed) --------------------------------------------------

_FONT = {  # 3x5 glyphs, rows top to bottom, 3 bits each
    "0": "111101101101111",
    "1": "010110010010111",
    "2": "111001111100111",
    "3": "111001111001111",
    "4": "101101111001001",
    "5": "111100111001111",
    "6": "111100111101111",
    "7": "111001001010010",
    "8": "111101111101111",
    "9": "111101111001111",
    ".": "000000000000010",
    "/": "001001010100100",
    "-": "000000111000000",
    " ": "000000000000000",
    "=": "000111000111000",
    "A": "010101111101101",
    "B": "110101110101110",
    "C": "111100100100111",
    "D": "110101101101110",
    "E": "111100110100111",
    "F": "111100110100100",
    "G": "111100101101111",
    "H": "101101111101101",
    "I": "111010010010111",
    "K": "101101110101101",
    "L": "100100100100111",
    "M": "101111111101101",
    "N": "110101101101101",
    "O": "111101101101111",
    "P": "111101111100100",
    "R": "110101110101101",
    "S": "111100111001111",
    "T": "111010010010010",
    "U": "101101101101111",
    "V": "101101101101010",
    "W": "101101111111101",
    "X": "101101010101101",
    "Y": "101101010010010",
    ":": "000010000010000",
}


class Canvas:
    def __init__(self, w: int, h: int) -> None:
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def rect(self, x0: int, y0: int, x1: int, y1: int, rgb: tuple[int, int, int]) -> None:
        for y in range(max(0, y0), min(self.h, y1)):
            row = y * self.w * 3
            for x in range(max(0, x0), min(self.w, x1)):
                self.px[row + 3 * x : row + 3 * x + 3] = bytes(rgb)

    def text(self, x: int, y: int, s: str, scale: int = 2, rgb=(0, 0, 0)) -> None:
        for ch in s.upper():
            glyph = _FONT.get(ch, _FONT[" "])
            for i, bit in enumerate(glyph):
                if bit == "1":
                    gx, gy = x + (i % 3) * scale, y + (i // 3) * scale
                    self.rect(gx, gy, gx + scale, gy + scale, rgb)
            x += 4 * scale

    def save(self, path: str) -> None:
        raw = b"".join(
            b"\x00" + bytes(self.px[y * self.w * 3 : (y + 1) * self.w * 3]) for y in range(self.h)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            return (
                struct.pack(">I", len(data))
                + kind
                + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
            )

        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n")
            f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)))
            f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
            f.write(chunk(b"IEND", b""))


def draw(report: dict[str, Any], path: str) -> None:
    """Bars: measured tok/s per mode and batch, then the simulated prediction."""
    bars: list[tuple[str, float, tuple[int, int, int]]] = []
    colours = {"ar": (90, 90, 90), "sd": (60, 120, 200), "ssd": (220, 120, 40)}
    for r in report["timed"]:
        label = f"{r['mode']}{'T' if r['driver'] == 'threaded' else ''}{r['batch']}"
        bars.append((label, r["tokens_per_s_median"], colours[r["mode"]]))
    for mode, r in (report.get("simulated") or {}).items():
        bars.append((f"P-{mode}", r["tokens_per_s"], tuple(c // 2 + 100 for c in colours[mode])))
    w, h, top, bottom = max(440, 40 + 70 * len(bars)), 330, 40, 60
    canvas = Canvas(w, h)
    canvas.text(10, 10, f"TOK/S  {report['environment'].get('gpu', 'CPU DRY RUN')}"[:60])
    peak = max((v for _, v, _ in bars), default=1.0) or 1.0
    for i, (label, value, rgb) in enumerate(bars):
        x = 30 + 70 * i
        height = int((h - top - bottom) * value / peak)
        canvas.rect(x, h - bottom - height, x + 50, h - bottom, rgb)
        canvas.text(x, h - bottom - height - 14, f"{value:.0f}" if value >= 10 else f"{value:.1f}")
        canvas.text(x, h - bottom + 8, label[:6])
    canvas.rect(20, h - bottom, w - 10, h - bottom + 2, (0, 0, 0))
    canvas.text(10, h - 24, "N=BATCH  T=THREADED  P-=PREDICTED AT ACCEPTANCE 0.87")
    canvas.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, < 1 min")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--out", default="gpu_check_out")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per run")
    parser.add_argument(
        "--count-tokens",
        type=int,
        default=24,
        help="new tokens in each counting run (Python modes are slow)",
    )
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--fanout", type=int, default=8)
    parser.add_argument("--kv-tokens", type=int, default=None)
    parser.add_argument("--no-upper-bound", dest="upper_bound", action="store_false")
    parser.add_argument(
        "--no-onnxruntime",
        dest="onnxruntime",
        action="store_false",
        help="skip the onnxruntime section (it runs when onnxruntime is installed)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=None, help="stop starting new steps after this long"
    )
    args = parser.parse_args(argv)
    dry = args.dry_run
    defaults = {
        "prompt": (16, 128),
        "tokens": (12, 64),
        "batches": ("1,2", "1,4"),
        "reps": (2, 3),
        "kv_tokens": (1024, 8192),
        "budget_s": (50.0, 600.0),
    }
    for key, (small, big) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if dry else big)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    missing = preflight()
    if missing:
        print(explain_missing(missing), file=sys.stderr)
        return 3
    import torch

    if not dry and not torch.cuda.is_available():
        print(
            "no CUDA device here; run with --dry-run to exercise the script on CPU", file=sys.stderr
        )
        return 4
    os.makedirs(args.out, exist_ok=True)
    check = Check(args)
    report = check.run()
    json_path = os.path.join(args.out, "gpu_check.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    draw(report, os.path.join(args.out, "gpu_check.png"))
    log.info(
        "wrote %s and gpu_check.png in %.1f s; skipped: %s; failures: %s",
        json_path,
        report["elapsed_s"],
        report["skipped"] or "none",
        report["failures"] or "none",
    )
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
