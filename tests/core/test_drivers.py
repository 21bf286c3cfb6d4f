"""The same seed gives the same tokens under every driver; threads really overlap."""

from __future__ import annotations

import threading

import pytest

from backends.reference import ReferenceModel
from ssd_core import LatencyModel, SamplingParams, SSDConfig, generate

from .helpers import pair


@pytest.mark.parametrize("mode", ["ar", "sd", "ssd"])
@pytest.mark.parametrize("fallback", ["neural", "fast"])
def test_same_seed_same_tokens_under_every_driver(mode, fallback):
    target, draft = pair(vocab=20, seed=5)
    kw = dict(
        prompts=[[1, 2, 3], [4], [5, 6]],
        mode=mode,
        max_new_tokens=25,
        sampling=[
            SamplingParams(temperature=1.0),
            SamplingParams(temperature=0.7, top_p=0.9),
            SamplingParams(temperature=1.3, top_k=5, draft_temperature=1.0),
        ],
        config=SSDConfig(k=3, fanout=6, fallback=fallback, saguaro_c=0.5),
        seed=11,
    )
    runs = {
        d: generate(target, draft, driver=d, **kw) for d in ("sequential", "threaded", "simulated")
    }
    assert runs["sequential"].tokens == runs["threaded"].tokens == runs["simulated"].tokens
    assert (
        runs["sequential"].tokens
        != generate(target, draft, driver="sequential", **{**kw, "seed": 12}).tokens
    )


def test_threaded_driver_overlaps_draft_and_target():
    lat_t = LatencyModel(per_call=0.02)
    lat_d = LatencyModel(per_call=0.004)
    target = ReferenceModel.random(vocab_size=32, order=2, seed=1, peakedness=3.0, latency=lat_t)
    draft = ReferenceModel.perturbed(target, divergence=0.3, latency=lat_d)
    before = threading.active_count()
    out = generate(
        target,
        draft,
        prompts=[[1, 2]],
        mode="ssd",
        max_new_tokens=30,
        sampling=SamplingParams(temperature=0.0),
        config=SSDConfig(k=3, fanout=4, fallback="fast"),
        driver="threaded",
    )
    m = out.metrics
    assert threading.active_count() == before  # workers joined
    # Both lanes were busy for most of the run at the same time: the wall clock is
    # far below the sum of the two lanes' busy times.
    assert m.wall_s < 0.8 * (m.target_busy_s + m.draft_busy_s)
    assert m.draft_busy_s > 0.3 * m.target_busy_s


def test_simulated_driver_charges_the_latency_model():
    lat = LatencyModel(per_call=0.01, per_token=0.001)
    target = ReferenceModel.random(vocab_size=16, order=1, seed=2, latency=lat, sleep=False)
    out = generate(target, None, prompts=[[1]], mode="ar", max_new_tokens=10, driver="simulated")
    # 10 one-token verification passes (the open is charged per_call too).
    assert out.metrics.target_busy_s == pytest.approx(10 * 0.011 + 0.01)
    assert out.metrics.wall_s == pytest.approx(out.metrics.target_busy_s)
