"""Threaded-driver overlap: SSD wall time vs the busier of the two lanes.

Reference models sleep for a GPU-like modelled latency on every call (outside the GIL),
so the draft and target lanes can overlap for real. A perfect overlap gives a ratio of
1.0: the run takes exactly as long as its busier lane.

    python scripts/bench_overlap.py
"""

from __future__ import annotations

from backends.reference import ReferenceModel
from ssd_core import LatencyModel, SamplingParams, SSDConfig, generate


def main() -> None:
    # Warm up imports and caches so the first row is not charged for them.
    warm = ReferenceModel.random(vocab_size=256, order=2, seed=1)
    generate(
        warm,
        ReferenceModel.perturbed(warm),
        prompts=[[1]],
        mode="ssd",
        max_new_tokens=8,
        driver="threaded",
    )
    print(
        f"{'T_verify':>8} {'T_dstep':>7} {'fallback':>8} {'rounds':>6} {'target_s':>8} {'draft_s':>7} "
        f"{'wall_s':>6} {'wall/max':>8} {'hit':>5}"
    )
    for t_verify, t_step in ((0.020, 0.002), (0.020, 0.004), (0.010, 0.002)):
        for fallback in ("fast", "neural"):
            target = ReferenceModel.random(
                vocab_size=256,
                order=2,
                seed=1,
                peakedness=3.0,
                latency=LatencyModel(per_call=t_verify),
            )
            draft = ReferenceModel.perturbed(
                target, divergence=0.3, seed=2, latency=LatencyModel(per_call=t_step)
            )
            r = generate(
                target,
                draft,
                prompts=[[1, 2, 3]],
                mode="ssd",
                max_new_tokens=96,
                sampling=SamplingParams(temperature=0.0),
                config=SSDConfig(k=4, fanout=8, fallback=fallback),
                driver="threaded",
            )
            m = r.metrics
            ratio = m.wall_s / max(m.target_busy_s, m.draft_busy_s)
            print(
                f"{t_verify * 1e3:6.0f}ms {t_step * 1e3:5.0f}ms {fallback:>8} {m.rounds:6d} "
                f"{m.target_busy_s:8.3f} {m.draft_busy_s:7.3f} {m.wall_s:6.3f} {ratio:8.3f} "
                f"{m.cache_hit_rate:5.0%}"
            )


if __name__ == "__main__":
    main()
