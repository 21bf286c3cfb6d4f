"""The package is ``backends.onnxruntime`` and must never shadow the real ``onnxruntime``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    return out.stdout.strip()


def test_backend_imports_the_real_onnxruntime_and_nothing_heavy():
    out = _run(
        "import sys, backends.onnxruntime as b, onnxruntime as o;"
        "print(o.__file__ != b.__file__ and hasattr(o, 'InferenceSession'),"
        " 'torch' in sys.modules, 'onnx' in sys.modules)"
    )
    assert out == "True False False"


def test_core_and_backends_package_do_not_import_onnxruntime():
    out = _run("import sys, ssd_core, backends; print('onnxruntime' in sys.modules)")
    assert out == "False"
