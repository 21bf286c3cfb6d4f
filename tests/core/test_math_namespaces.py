"""The math runs unchanged on torch tensors (the CUDA path, exercised on the CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from ssd_core import SamplingParams, SeededSource
from ssd_core.testing import accept_probabilities, draft_weights, residual_weights, target_probs

torch = pytest.importorskip("torch")

PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.7),
    SamplingParams(temperature=1.5, min_p=0.1),
]


@pytest.mark.parametrize("device", ["cpu"])  # "cuda:0" is the same code path: scripts/gpu_check.py
def test_numpy_and_torch_agree(device):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4, 50)) * 2
    zt = torch.tensor(z, dtype=torch.float64, device=device)
    p_np = target_probs(z, PARAMS)
    p_t = target_probs(zt, PARAMS)
    assert isinstance(p_t, torch.Tensor) and p_t.device.type == torch.device(device).type
    np.testing.assert_allclose(p_t.cpu().numpy(), p_np, atol=1e-12)
    w_np = draft_weights(z, [1.0, 0.5, 0.0, 2.0], [3, 0, 2, 5], 0.3)
    w_t = draft_weights(zt, [1.0, 0.5, 0.0, 2.0], [3, 0, 2, 5], 0.3)
    np.testing.assert_allclose(w_t.cpu().numpy(), w_np, atol=1e-12)
    toks = [1, 2, 3, 4]
    assert accept_probabilities(p_t, w_t, toks) == pytest.approx(
        accept_probabilities(p_np, w_np, toks), abs=1e-12
    )
    np.testing.assert_allclose(
        residual_weights(p_t[1], w_t[1]).cpu().numpy(),
        residual_weights(p_np[1], w_np[1]),
        atol=1e-12,
    )
    src = SeededSource(3)
    keys = [("k", i) for i in range(4)]
    assert src.categorical(keys, p_t) == src.categorical(keys, p_np)


def test_float32_logits_are_promoted():
    z = torch.randn(2, 10, dtype=torch.float32)
    p = target_probs(z.to(torch.float64), [SamplingParams()] * 2)
    assert p.dtype == torch.float64


def test_top_ids_and_ranks_agree_on_device_arrays():
    from ssd_core.testing import count_above, top_ids

    z = np.round(np.random.default_rng(1).standard_normal(40), 1)  # ties
    z[3] = -np.inf
    zt = torch.tensor(z)
    for count in (1, 3, 10, 39):
        for exclude in (None, int(np.argmax(z)), 5):
            assert top_ids(zt, count, exclude) == top_ids(z, count, exclude)
            assert 3 not in top_ids(z, count, exclude)
    for t in range(40):
        assert count_above(zt, t, 7) == count_above(z, t, 7)
        ranked = top_ids(z, 40, 7)
        if t in ranked:
            assert ranked.index(t) == count_above(z, t, 7)
