"""check_lossless on every in-house engine backend's small models (slow tier).

Each run: greedy identity AR == SD == SSD, then the quick plan's Bonferroni family of
G-tests (SD, SSD-neural, SSD-fast at T=1, 6 bins, n = 4000 each: power >= 0.91 per test
at binned TV 0.05) against the exact processed target. The reference backend's full
family runs in tests/exactness.
"""

from __future__ import annotations

import pytest

from conformance import check_lossless, lossless_plan


def _pair(backend: str):
    if backend == "torch":
        pytest.importorskip("torch")
        from backends.torch import BACKEND

        return (
            lambda: BACKEND.load("tiny,vocab=64,seed=1", {"threads": 1}),
            lambda: BACKEND.load("tiny,vocab=64,seed=2", {"threads": 1}),
        )
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("torch")
        from backends.onnxruntime import BACKEND

        return (lambda: BACKEND.load("tiny-target", {}), lambda: BACKEND.load("tiny-draft", {}))
    pytest.importorskip("llama_cpp")
    from backends.llama_cpp import BACKEND
    from backends.ngram import NgramModel

    target = BACKEND.load("tiny", {"n_threads": 1})
    vocab = target.vocab_size
    target.free()
    return (
        lambda: BACKEND.load("tiny", {"n_threads": 1}),
        lambda: NgramModel(vocab_size=vocab, max_n=3, alpha=1e-2),
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "llama_cpp"])
def test_backend_is_lossless(backend):
    make_target, make_draft = _pair(backend)
    report = check_lossless(make_target, make_draft, subject=backend, **lossless_plan(quick=True))
    report.raise_for_failures()
    assert "power >= 0.91" in report.settings
