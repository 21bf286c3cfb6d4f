"""What SSD buys on accelerators, predicted with the simulated driver.

Each model call is charged a GPU-like latency (a memory-bound forward pass costs about
the same for 1 or 24 tokens), on two virtual devices. The tokens are computed for real
by exact reference models; only the clock is simulated.

    python examples/simulated_gpu.py
"""

from backends.reference import ReferenceModel
from ssd_core import LatencyModel, SamplingParams, SSDConfig, generate

target_latency = LatencyModel(per_call=0.020, per_token=0.0001)  # a 70B-class target
draft_latency = LatencyModel(per_call=0.002, per_token=0.00005)  # a 1B-class draft

target = ReferenceModel.random(
    vocab_size=512, order=2, seed=1, peakedness=4.0, latency=target_latency, sleep=False
)
draft = ReferenceModel.perturbed(target, divergence=0.8, seed=2, latency=draft_latency, sleep=False)

# One sampled run is one path: its acceptance swings by +-10 %, so each mode is pooled
# over 12 requests (one at a time: batch 1, as in the paper's headline figures).
PROMPTS = [[1 + i % 7, 2, 3] for i in range(12)]

for temperature in (0.0, 1.0):
    sampling = SamplingParams(temperature=temperature)
    print(f"temperature {temperature}")
    base = None
    for mode in ("ar", "sd", "ssd"):
        tokens = seconds = accepted = tried = hits = rounds = 0.0
        for seed, prompt in enumerate(PROMPTS):
            m = generate(
                target,
                draft,
                prompts=[prompt],
                mode=mode,
                max_new_tokens=128,
                sampling=sampling,
                config=SSDConfig(k=4, fanout=16, fallback="neural"),
                driver="simulated",
                seed=seed,
            ).metrics
            tokens += m.generated_tokens
            seconds += m.wall_s
            accepted += m.acceptance_per_token * m.rounds
            tried += m.rounds
            hits += m.cache_hit_rate * m.rounds
            rounds += m.rounds
        tps = tokens / seconds
        base = base or tps
        print(
            f"  {mode:3s} {tps:7.1f} simulated tok/s ({tps / base:4.2f}x AR)"
            f"  acceptance {accepted / tried:4.0%}  cache hits {hits / rounds:4.0%}"
        )
