"""The GPU check's dry run on CPU (tiny shapes): the script CI can run without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
        env=env,
    )


def test_dry_run_writes_a_complete_report(tmp_path):
    proc = _run("--dry-run", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["failures"] == [] and report["skipped"] == []
    modes = {(r["mode"], r["driver"], r["batch"]) for r in report["timed"]}
    assert {("ar", "sequential", 1), ("sd", "sequential", 2), ("ssd", "threaded", 1)} <= modes
    assert all(r["tokens_per_s_median"] > 0 for r in report["timed"])
    assert report["greedy_identity"] and all(report["greedy_identity"].values())
    counted = {(c["mode"], c["batch"]): c for c in report["counted"]}
    assert set(counted) == {(m, b) for m in ("ar", "sd", "ssd") for b in (1, 2)}
    for c in counted.values():
        assert c["host_syncs_per_round"] > 0 and c["bytes_copied_per_round"] > 0
        # the torch backend itself stays sync-free: every counted site is outside it
        assert not [s for s in c["host_sync_top_sites"] if "backends/torch" in s]
    assert [r["runs"][0]["acceptance_per_token"] for r in report["upper_bound"]] == [1.0, 1.0]
    assert set(report["simulated"]) == {"ar", "sd", "ssd"}
    ort = report.get("onnxruntime", {})
    if "skipped" not in ort:  # onnxruntime installed: its section ran on torch CPU buffers
        assert ort["kv_on_device"] and ort["device_vs_cpu_max_abs_diff"] < 1e-4
        assert all(m["greedy_identical"] for m in ort["modes"].values())
    run = report["timed"][0]["runs"][0]
    assert run["target_calls"]["calls"] > 0 and run["peak_mib"] > 0


def test_without_cuda_it_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = _run("--out", str(tmp_path), timeout=120)
    assert proc.returncode == 4 and "--dry-run" in proc.stderr


def test_missing_packages_are_explained():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    text = gpu_check.explain_missing(["array-api-compat", "attrs"])
    assert "pip install --no-index --find-links wheels array-api-compat attrs" in text
    assert "pip download" in text
    assert gpu_check.preflight() == []
    assert gpu_check.overlap_fraction([(0, 2), (4, 6)], [(1, 5)]) == pytest.approx(0.5)
    assert gpu_check.fit_latency([{"tokens": 1, "ms": 3.0}, {"tokens": 3, "ms": 7.0}]) == (
        pytest.approx(1.0),
        pytest.approx(2.0),
    )
