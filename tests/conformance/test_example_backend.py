"""The minimal backend in docs/backend-authors.md (and examples/) passes the suite."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import conformance

ROOT = Path(__file__).resolve().parents[2]


def _load_example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "minimal_backend", ROOT / "examples" / "minimal_backend.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_minimal_backend_conforms() -> None:
    example = _load_example()
    report = conformance.assert_conforms(example.make_model, quick=False)
    assert "tolerance 0.0001" in report.settings  # float32 logits


def test_docs_show_the_same_code_as_the_example() -> None:
    docs = (ROOT / "docs" / "backend-authors.md").read_text()
    code = (ROOT / "examples" / "minimal_backend.py").read_text()
    blocks = re.findall(r"```python\n(.*?)```", docs, flags=re.S)
    assert any(block.strip() == code.strip() for block in blocks), (
        "docs/backend-authors.md must contain examples/minimal_backend.py verbatim"
    )
