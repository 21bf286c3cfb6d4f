"""How many rows the draft scores for the same SSD run (draft work per token).

    python scripts/count_draft_rows.py
"""

from __future__ import annotations

from backends.reference import ReferenceModel
from ssd_core import SamplingParams, SSDConfig, generate


class Counting(ReferenceModel):
    rows = 0

    def extend(self, requests):
        out = super().extend(requests)
        Counting.rows += out.shape[0]
        return out


def main() -> None:
    target = ReferenceModel.random(vocab_size=64, order=2, seed=1, peakedness=3)
    base = ReferenceModel.perturbed(target, divergence=0.3)
    draft = Counting(base._raw_fn, vocab_size=64, order=2)
    for temperature in (0.0, 1.0):
        Counting.rows = 0
        r = generate(target, draft, prompts=[[1, 2]], mode="ssd", max_new_tokens=100,
                     sampling=SamplingParams(temperature=temperature),
                     config=SSDConfig(k=4, fanout=6, fallback="neural"))
        print(f"T={temperature}: draft rows {Counting.rows}, rounds {r.metrics.rounds}, "
              f"cache hits {r.metrics.cache_hit_rate:.0%}")


if __name__ == "__main__":
    main()
