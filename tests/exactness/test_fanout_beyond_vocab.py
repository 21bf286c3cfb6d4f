"""Defect 1 of issue 14: Saguaro sampling with a fan-out entry F larger than the
vocabulary V.

Saguaro down-weights (by C) the draft tokens whose logit is >= the F-th largest, i.e.
the tokens the next tree will cache. With F > V the tree caches every token, so every
token must be down-weighted: the k-th largest must be taken at min(F, V). Before the
fix the partition index V - F went negative, so for V < F <= 2V numpy wrapped it round
and down-weighted the wrong (smaller) set, and for F >= 2V + 1 it raised ValueError --
which crashed the default budget (12) with C = 0.5 on a vocabulary of 4 whenever the
adaptive rule put most of the budget on F_0 (a poor draft).
"""

from __future__ import annotations

import numpy as np
import pytest

from backends.reference import ReferenceModel
from ssd_core import SamplingParams, SeededSource, SSDConfig, generate
from ssd_core.testing import draft_weights

V = 4
# Distinct logits, a tie at the boundary, and an impossible token.
ROWS = {
    "distinct": np.array([3.0, 2.0, 1.0, 0.0]),
    "ties": np.array([1.0, 2.0, 2.0, 0.5]),
    "minus-inf": np.array([1.5, -np.inf, 0.5, 2.0]),
}


def expected_down(row: np.ndarray, f: int) -> np.ndarray:
    """The tokens Saguaro must down-weight: logit >= the min(F, V)-th largest."""
    kth = np.sort(row)[::-1][min(f, row.shape[0]) - 1]
    return row >= kth


@pytest.mark.parametrize("f", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 40])
@pytest.mark.parametrize("row", sorted(ROWS))
@pytest.mark.parametrize("mixed_greedy", [False, True], ids=["numpy-fast", "generic"])
def test_down_weights_exactly_the_cached_tokens(row: str, f: int, mixed_greedy: bool) -> None:
    z = ROWS[row]
    c = 0.25
    # A greedy second row sends the call through the generic (array-API) path.
    logits = np.stack([z, z]) if mixed_greedy else z[None, :]
    temps = [1.0, 0.0] if mixed_greedy else [1.0]
    fans = [f, f] if mixed_greedy else [f]
    w = np.asarray(draft_weights(logits, temps, fans, c))[0]
    plain = np.exp(z - z[np.isfinite(z)].max())
    finite = np.isfinite(z)
    ratio = w[finite] / plain[finite]
    ratio = ratio / ratio.max()  # weights are defined up to a per-row scale
    want = np.where(expected_down(z, f)[finite], c, 1.0)
    want = want / want.max()
    np.testing.assert_allclose(ratio, want, rtol=1e-12)
    assert np.all(w[~finite] == 0.0)


def test_torch_path_agrees_beyond_the_vocabulary() -> None:
    torch = pytest.importorskip("torch")
    z = np.stack([ROWS["distinct"], ROWS["ties"]])
    for f in (5, 9):
        w_np = np.asarray(draft_weights(z, [1.0, 1.0], [f, 2], 0.3))
        w_t = draft_weights(torch.tensor(z), [1.0, 1.0], [f, 2], 0.3)
        got = w_t.cpu().numpy()
        np.testing.assert_allclose(
            got / got.max(axis=1, keepdims=True), w_np / w_np.max(axis=1, keepdims=True), rtol=1e-12
        )


@pytest.mark.parametrize("driver", ["sequential", "threaded", "simulated"])
def test_default_budget_with_saguaro_on_a_tiny_vocabulary_runs(driver: str) -> None:
    """The issue's crash: budget 12, C = 0.5, vocabulary 4, a poor draft (the adaptive
    rule puts most of the budget on F_0, so F_0 > 2V + 1). Under the threaded driver the
    fault used to be swallowed by degrading to target-only; ``on_draft_error="raise"``
    makes it visible. Every draw name stays unique too."""
    target = ReferenceModel.random(vocab_size=V, order=2, seed=2, peakedness=2.0)
    draft = ReferenceModel.random(vocab_size=V, order=2, seed=99, peakedness=2.0)
    res = generate(
        target,
        draft,
        prompts=[[0, 1]] * 8,
        mode="ssd",
        max_new_tokens=24,
        sampling=SamplingParams(temperature=1.0),
        config=SSDConfig(saguaro_c=0.5),
        driver=driver,
        source=SeededSource(5, check_unique=True),
        on_draft_error="raise",  # a draft-lane fault must not hide behind degrading
    )
    assert [len(t) for t in res.tokens] == [24] * 8
    assert res.metrics.draft_faults == 0
    assert res.metrics.cache_lookups > 0
