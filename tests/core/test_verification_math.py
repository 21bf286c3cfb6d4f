"""One verification position is exact: enumerated over every draft token and outcome,
the distribution of the emitted token equals the processed target distribution."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ssd_core import SamplingParams
from ssd_core.testing import accept_probabilities, draft_weights, residual_weights, target_probs


def _logit_rows(draw, v):
    kind = draw(st.sampled_from(["normal", "ties", "zeros"]))
    z = np.array(draw(st.lists(st.floats(-4, 4), min_size=v, max_size=v)))
    if kind == "ties":
        z = np.round(z)
    if kind == "zeros":
        mask = np.array(draw(st.lists(st.booleans(), min_size=v, max_size=v)))
        mask[draw(st.integers(0, v - 1))] = False
        z[mask] = -np.inf
    return z


@st.composite
def position(draw):
    v = draw(st.integers(2, 8))
    zt = _logit_rows(draw, v)
    zd = _logit_rows(draw, v)
    params = SamplingParams(
        temperature=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
        top_k=draw(st.integers(0, v)),
        top_p=draw(st.sampled_from([1.0, 0.9, 0.5, 0.2])),
        min_p=draw(st.sampled_from([0.0, 0.1, 0.5])),
    )
    kind = draw(st.sampled_from(["draft", "point"]))
    if kind == "point":
        q = np.zeros((1, v))
        q[0, draw(st.integers(0, v - 1))] = 1.0
    else:
        q = draft_weights(
            zd[None, :],
            [draw(st.sampled_from([0.0, 0.7, 1.0, 1.5]))],
            [draw(st.integers(0, v))],
            draw(st.sampled_from([1.0, 0.5, 0.05])),
        )
    return zt, params, q


@given(position())
def test_one_position_is_exact(case):
    zt, params, q = case
    p = target_probs(zt[None, :], [params])[0]
    qn = q[0] / q[0].sum()
    out = np.zeros_like(p)
    for d in np.flatnonzero(qn > 0):
        a = accept_probabilities(p[None, :], q, [int(d)])[0]
        r = residual_weights(p, q[0])
        out[d] += qn[d] * a
        out += qn[d] * (1 - a) * r / r.sum()
    np.testing.assert_allclose(out, p, atol=1e-12)


def _reference_process(z, params):
    """A plain, loop-based re-implementation of the documented processing."""
    v = len(z)
    if params.temperature == 0:
        out = np.zeros(v)
        out[int(np.argmax(z))] = 1.0
        return out
    z = z / params.temperature
    if 0 < params.top_k < v:
        kth = sorted(z, reverse=True)[params.top_k - 1]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1:
        keep = np.array([p[p > p[t]].sum() < params.top_p for t in range(v)])
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    if params.min_p > 0:
        p = np.where(p >= params.min_p * p.max(), p, 0.0)
        p /= p.sum()
    return p


@given(position())
def test_target_processing_matches_a_plain_reimplementation(case):
    zt, params, _ = case
    got = target_probs(zt[None, :], [params])[0]
    np.testing.assert_allclose(got, _reference_process(zt, params), atol=1e-12)
    assert abs(got.sum() - 1) < 1e-12


def test_saguaro_downweights_exactly_the_top_f():
    z = np.log(np.array([[0.4, 0.3, 0.2, 0.1]]))
    w = draft_weights(z, [1.0], [2], 0.5)[0]
    q = w / w.sum()
    expected = np.array([0.2, 0.15, 0.2, 0.1])
    np.testing.assert_allclose(q, expected / expected.sum())
