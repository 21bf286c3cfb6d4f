"""AR, SD and SSD on exact reference models: same greedy tokens, different work.

python examples/quickstart.py
"""

from backends.reference import ReferenceModel
from ssd_core import SamplingParams, SSDConfig, generate

target = ReferenceModel.random(vocab_size=128, order=2, seed=1, peakedness=3.0)
draft = ReferenceModel.perturbed(target, divergence=0.5, seed=2)

greedy = SamplingParams(temperature=0.0)
config = SSDConfig(k=4, fanout=12)
runs = {
    mode: generate(
        target,
        draft,
        prompts=[[1, 2, 3]],
        mode=mode,
        max_new_tokens=48,
        sampling=greedy,
        config=config,
    )
    for mode in ("ar", "sd", "ssd")
}
for mode, r in runs.items():
    print(f"{mode:3s} {r.metrics.summary()}")
assert runs["ar"].tokens == runs["sd"].tokens == runs["ssd"].tokens
print("greedy tokens identical in all three modes:", runs["ssd"].tokens[0][:16], "...")

# Sampling at temperature 1 with Saguaro sampling: same distribution as the target.
r = generate(
    target,
    draft,
    prompts=[[1, 2, 3], [9]],
    mode="ssd",
    max_new_tokens=32,
    sampling=SamplingParams(temperature=1.0, top_p=0.95),
    config=SSDConfig(k=4, fanout=12, saguaro_c=0.5),
    seed=7,
)
print("sampled:", r.tokens[0][:16], "...", r.finish_reasons, r.metrics.summary())
