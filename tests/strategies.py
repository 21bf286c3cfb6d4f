"""Hypothesis strategies that generate the library's own values: model pairs,
sampling parameters, SSD configurations and whole exact-enumeration cases.

The enumeration cases are sized so that one whole-machine enumeration stays well under
a second: the vocabulary (2-6) shrinks as K grows (V**K <= 9) and batches of two
prompts use V <= 3, K <= 2 and at most 2 new tokens.
"""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import strategies as st

from backends.reference import ReferenceModel
from ssd_core import SamplingParams, SSDConfig

__all__ = [
    "MODEL_KINDS",
    "ExactCase",
    "exact_cases",
    "fanouts",
    "model_pairs",
    "sampling_params",
]

#: How a generated model looks: flat (uniform), peaked, with zero-probability
#: entries, or with exact ties between logits.
MODEL_KINDS = ("flat", "mild", "peaked", "zeros", "ties")

#: The largest vocabulary per K that keeps a whole-machine enumeration cheap.
MAX_VOCAB_FOR_K = {1: 6, 2: 3, 3: 2}


def _model(kind: str, vocab: int, order: int, seed: int, name: str) -> ReferenceModel:
    if kind == "flat":
        return ReferenceModel.random(
            vocab_size=vocab, order=order, seed=seed, peakedness=0.0, name=name
        )
    if kind == "mild":
        return ReferenceModel.random(
            vocab_size=vocab, order=order, seed=seed, peakedness=1.0, name=name
        )
    if kind == "peaked":
        return ReferenceModel.random(
            vocab_size=vocab, order=order, seed=seed, peakedness=3.0, name=name
        )
    if kind == "zeros":
        return ReferenceModel.random(
            vocab_size=vocab, order=order, seed=seed, peakedness=1.5, zero_fraction=0.34, name=name
        )
    return ReferenceModel.random(
        vocab_size=vocab, order=order, seed=seed, peakedness=1.0, tie_levels=2, name=name
    )


@st.composite
def model_pairs(
    draw: Any, vocab: int | None = None, order: int | None = None
) -> tuple[ReferenceModel, ReferenceModel]:
    """A (target, draft) pair of reference models.

    The draft is either a perturbed copy of the target (close: high acceptance) or an
    independent model of any kind (far: low acceptance, possibly putting mass where
    the target has none, or none where the target has some).
    """
    v = vocab if vocab is not None else draw(st.integers(2, 6))
    o = order if order is not None else draw(st.integers(1, 2))
    seed = draw(st.integers(0, 10_000))
    target = _model(draw(st.sampled_from(MODEL_KINDS)), v, o, seed, "target")
    if draw(st.booleans()):
        draft = ReferenceModel.perturbed(
            target, divergence=draw(st.sampled_from([0.0, 0.5, 2.0])), seed=seed + 1
        )
    else:
        draft = _model(draw(st.sampled_from(MODEL_KINDS)), v, o, seed + 7, "draft")
    return target, draft


@st.composite
def sampling_params(
    draw: Any,
    vocab: int,
    temperatures: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0),
    processors: bool = True,
    draft_temperature: bool = True,
) -> SamplingParams:
    """Sampling parameters: temperature, top-k, top-p, min-p, a draft temperature."""
    kw: dict[str, Any] = {"temperature": draw(st.sampled_from(temperatures))}
    if processors:
        if draw(st.booleans()):
            kw["top_k"] = draw(st.integers(1, vocab))
        if draw(st.booleans()):
            kw["top_p"] = draw(st.sampled_from([0.3, 0.6, 0.9]))
        if draw(st.booleans()):
            kw["min_p"] = draw(st.sampled_from([0.1, 0.3]))
    if draft_temperature and draw(st.booleans()):
        kw["draft_temperature"] = draw(st.sampled_from([0.0, 0.7, 1.0, 1.5]))
    return SamplingParams(**kw)


def fanouts(k: int, vocab: int) -> st.SearchStrategy[tuple[int, ...]]:
    """Fan-out lists F_0..F_K, zeros allowed at any position."""
    return st.tuples(*[st.integers(0, vocab) for _ in range(k + 1)])


@attrs.frozen(kw_only=True)
class ExactCase:
    """Everything :func:`conformance.exact.compare_exact` needs."""

    target: ReferenceModel
    draft: ReferenceModel
    vocab: int
    prompts: tuple[tuple[int, ...], ...]
    params: tuple[SamplingParams, ...]
    mode: str
    config: SSDConfig
    max_new: int

    def kwargs(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab,
            "prompts": self.prompts,
            "params": self.params,
            "mode": self.mode,
            "config": self.config,
            "max_new_tokens": self.max_new,
        }


@st.composite
def exact_cases(
    draw: Any,
    mode: str | None = None,
    fallback: str | None = None,
    ks: tuple[int, ...] = (1, 2, 3),
    batch: int = 1,
    temperatures: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0),
    processors: bool = True,
    saguaro: tuple[float, ...] = (1.0, 0.5, 0.05),
    stops: bool = False,
    max_vocab: int = 6,
) -> ExactCase:
    """A whole-machine enumeration case, sized to enumerate in well under a second."""
    mode = mode or draw(st.sampled_from(["sd", "ssd"]))
    k = draw(st.sampled_from(ks))
    max_v = min(MAX_VOCAB_FOR_K[k] if batch == 1 else (3 if k == 1 else 2), max_vocab)
    v = draw(st.integers(2, max_v))
    target, draft = draw(model_pairs(vocab=v))
    max_new = 3 if v**k <= 4 and batch == 1 and max_vocab > 3 else 2
    prompts = []
    for i in range(batch):
        n = draw(st.integers(1, 3)) if i == 0 else (len(prompts[0]) % 3) + 1  # different lengths
        prompts.append(tuple(draw(st.lists(st.integers(0, v - 1), min_size=n, max_size=n))))
    params = []
    for _ in range(batch):
        p = draw(sampling_params(v, temperatures=temperatures, processors=processors))
        if stops:
            stop_ids = (draw(st.integers(0, v - 1)),) if draw(st.booleans()) else None
            seqs = (tuple(draw(st.lists(st.integers(0, v - 1), min_size=2, max_size=2))),)
            p = attrs.evolve(p, stop_token_ids=stop_ids, stop_sequences=seqs)
        params.append(p)
    config = SSDConfig(
        k=k,
        fanout=draw(fanouts(k, v)),
        saguaro_c=draw(st.sampled_from(saguaro)),
        fallback=fallback or draw(st.sampled_from(["neural", "fast"])),
    )
    return ExactCase(
        target=target,
        draft=draft,
        vocab=v,
        prompts=tuple(prompts),
        params=tuple(params),
        mode=mode,
        config=config,
        max_new=max_new,
    )
