"""Fixtures for the onnxruntime backend tests: tiny random Llamas exported once per session.

Everything skips cleanly when onnxruntime, onnx or torch (needed to export) is missing.
This folder is deliberately not a package: as ``tests/onnxruntime`` with an
``__init__.py`` it would be importable as ``onnxruntime`` and shadow the real module.
"""

from __future__ import annotations

import numpy as np
import pytest

try:  # each test module skips itself (visibly) when one of these is missing
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch

    from backends.onnxruntime import OrtModel, build_tiny_llama, export_module
except ImportError:  # pragma: no cover - exercised only without the engine
    pass

VOCAB = 96
CONTEXT = 64
TARGET = dict(
    vocab_size=VOCAB,
    num_layers=2,
    hidden_size=32,
    num_heads=4,
    num_kv_heads=2,
    context_size=CONTEXT,
    seed=1,
    scale=0.3,
)
DRAFT = dict(
    TARGET, num_layers=1, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1, seed=2
)


@pytest.fixture(scope="session")
def onnx_files(tmp_path_factory) -> dict[str, str]:
    """Paths of the exported test graphs: target, target without cache, draft."""
    root = tmp_path_factory.mktemp("onnx")
    return {
        "target": export_module(build_tiny_llama(**TARGET), root / "target.onnx", name="target"),
        "target_nocache": export_module(
            build_tiny_llama(**TARGET, kv_cache=False),
            root / "target_nocache.onnx",
            name="target-nocache",
        ),
        "draft": export_module(build_tiny_llama(**DRAFT), root / "draft.onnx", name="draft"),
    }


@pytest.fixture(scope="session")
def torch_target():
    """The torch module the target graph was exported from (same weights)."""
    return build_tiny_llama(**TARGET)


def load(path: str, **kw) -> OrtModel:
    kw.setdefault("providers", ["CPUExecutionProvider"])
    kw.setdefault("threads", 1)
    return OrtModel.from_file(path, **kw)


def fresh_logits(model: OrtModel, tokens: list[int]) -> np.ndarray:
    """Logits for every position of ``tokens`` from one extend of an empty handle."""
    h = model.open([])
    try:
        return model.extend([(h, tokens)])
    finally:
        model.close(h)


def torch_logits(module, tokens: list[int]) -> np.ndarray:
    """Logits for every position from the torch module, cache-free."""
    n = len(tokens)
    args = [torch.tensor([tokens]), torch.ones((1, n), dtype=torch.int64), torch.arange(n)[None]]
    if module.kv_cache:
        args += [torch.zeros((1, module.num_kv_heads, 0, module.head_dim))] * (
            2 * module.num_layers
        )
    with torch.no_grad():
        return module(*args)[0][0].numpy()


class Helpers:
    VOCAB = VOCAB
    CONTEXT = CONTEXT
    load = staticmethod(load)
    fresh_logits = staticmethod(fresh_logits)
    torch_logits = staticmethod(torch_logits)


@pytest.fixture
def oh() -> type[Helpers]:
    return Helpers
