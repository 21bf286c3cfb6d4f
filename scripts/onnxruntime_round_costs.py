"""Bytes moved per round of AR / SD / SSD by the onnxruntime backend (tiny pair, CPU).

Counts, per lane, what a CUDA run would move between host and device -- every array
bound as an input that lives on the host, and every output copied back -- and the
device-side KV copies the backend makes (``model.stats["kv_copied_bytes"]``). Runs the
IOBinding path on the CPU provider: with ``--kv-on-device`` (torch buffers, what the
CUDA path uses when torch is installed) or without (numpy buffers, the path without
torch, and the only path before the KV cache moved to the device).

Usage::

    PYTHONPATH=. python scripts/onnxruntime_round_costs.py [--kv-on-device] [--json out.json]

It also runs against the older backend (no ``kv_on_device``, a different runner
signature): see docs/onnxruntime.md, "Bytes moved per round".
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import sys
import tempfile
from typing import Any

import numpy as np

from backends.onnxruntime import OrtModel, export_test_pair
from ssd_core import SamplingParams, SSDConfig, generate


def _nbytes(a: Any) -> int:
    if isinstance(a, np.ndarray):
        return int(a.nbytes)
    return int(a.numel() * a.element_size())


def _on_host(a: Any) -> bool:
    return isinstance(a, np.ndarray) or a.device.type == "cpu" and not _device_run


_device_run = False  # torch CPU tensors stand for device tensors (--kv-on-device)


class Counting:
    """Wraps ``model._run`` and counts host<->device traffic a CUDA run would have."""

    def __init__(self, model: OrtModel) -> None:
        self.model = model
        self.real = model._run
        self.bytes: collections.Counter[str] = collections.Counter()
        model._run = self  # type: ignore[assignment]
        self.new_api = "outputs" in inspect.signature(self.real.__call__).parameters

    def __call__(self, feeds: Any, outputs: Any) -> Any:
        arrays = [a for _, a, _ in feeds] if self.new_api else list(feeds.values())
        for a in arrays:
            if _on_host(a):
                self.bytes["host_to_device"] += _nbytes(a)
        out = self.real(feeds, outputs)
        for a in out:
            if _on_host(a):
                self.bytes["device_to_host"] += _nbytes(a)
        return out


def measure(paths: tuple[str, str], mode: str, batch: int, args: argparse.Namespace) -> dict:
    kw: dict[str, Any] = {"providers": ["CPUExecutionProvider"], "threads": 1, "io_binding": True}
    if "kv_on_device" in inspect.signature(OrtModel.from_file).parameters:
        kw["kv_on_device"] = args.kv_on_device
    lanes = {
        "target": OrtModel.from_file(paths[0], **kw),
        "draft": OrtModel.from_file(paths[1], **kw),
    }
    counts = {lane: Counting(m) for lane, m in lanes.items()}
    rng = np.random.default_rng(batch)
    prompts = [
        rng.integers(0, lanes["target"].vocab_size, args.prompt).tolist() for _ in range(batch)
    ]
    res = generate(
        lanes["target"],
        lanes["draft"],
        prompts=prompts,
        mode=mode,
        max_new_tokens=args.tokens,
        sampling=SamplingParams(temperature=0.0),
        config=SSDConfig(k=args.k, fanout=args.fanout),
        driver="sequential",
        seed=0,
    )
    rounds = res.metrics.rounds
    row: dict[str, Any] = {"mode": mode, "batch": batch, "rounds": rounds}
    for lane, c in counts.items():
        stats = getattr(lanes[lane], "stats", {})
        h2d = c.bytes["host_to_device"]
        if args.kv_on_device:  # the ids/mask/positions uploads (torch CPU tensors here)
            h2d += stats.get("upload_bytes", 0)
        row[lane] = {
            "host_to_device_per_round": h2d / rounds,
            "device_to_host_per_round": c.bytes["device_to_host"] / rounds,
            "kv_copied_on_device_per_round": stats.get("kv_copied_bytes", 0) / rounds,
        }
    return row


def main() -> int:
    global _device_run
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kv-on-device", action="store_true")
    parser.add_argument("--prompt", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--fanout", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    _device_run = args.kv_on_device
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_test_pair(tmp, context_size=256)
        for mode in ("ar", "sd", "ssd"):
            for batch in (1, 4):
                r = measure(paths, mode, batch, args)
                rows.append(r)
                t, d = r["target"], r["draft"]
                print(
                    f"{mode:3s} B={batch}: KiB/round  target h2d {t['host_to_device_per_round'] / 1024:8.1f}"
                    f" d2h {t['device_to_host_per_round'] / 1024:8.1f} dev-copy "
                    f"{t['kv_copied_on_device_per_round'] / 1024:7.1f} | draft h2d "
                    f"{d['host_to_device_per_round'] / 1024:8.1f} d2h "
                    f"{d['device_to_host_per_round'] / 1024:8.1f} dev-copy "
                    f"{d['kv_copied_on_device_per_round'] / 1024:7.1f}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
