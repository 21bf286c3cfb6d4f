"""Fixtures for the llama.cpp backend tests; the folder skips without llama-cpp-python."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from backends.llama_cpp import LlamaCppModel, from_gguf  # noqa: E402
from backends.llama_cpp.testing import write_tiny_llama_gguf  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama GGUF (2 layers, d=64, vocab 324), written once per session."""
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=0)


@pytest.fixture
def tiny(tiny_gguf: Path) -> Iterator[LlamaCppModel]:
    """A fresh llama.cpp model over the tiny GGUF, freed after the test."""
    model = from_gguf(tiny_gguf, n_threads=1, n_ctx=256, n_seq_max=16)
    yield model
    model.free()
