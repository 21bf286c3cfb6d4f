"""ssd_core imports no engine and no backend."""

from __future__ import annotations

import subprocess
import sys


def test_ssd_core_imports_no_engine():
    code = (
        "import sys, ssd_core, ssd_core.cli\n"
        "bad = [m for m in ('torch', 'llama_cpp', 'onnxruntime', 'transformers', 'backends', 'conformance')"
        " if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
