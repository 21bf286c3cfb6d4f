"""``import backends.torch`` is cheap: torch loads with the first model, under the CLI's
progress line, not while the command checks its flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]


def test_the_backend_spec_imports_without_torch_and_names_load_lazily():
    code = (
        "import sys, backends.torch as bt\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
        "print(bt.BACKEND.name, bt.TorchModel.__name__, 'torch' in sys.modules)\n"
        "print(sorted(set(bt.__all__) - set(dir(bt))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.splitlines() == ["False False", "torch TorchModel True", "[]"]


def test_unknown_names_are_attribute_errors():
    import backends.torch as bt

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bt.nope  # noqa: B018
