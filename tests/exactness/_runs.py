"""The statistical tier that runs what users run (docs/exactness.md, section 4).

Each *engine case* is one running :class:`~ssd_core.Engine` on the real seeded random
source (``SeededSource(seed, check_unique=True)``: a repeated draw name raises),
serving a mixed batch of requests -- different prompts and
:class:`~ssd_core.SamplingParams` -- that join as others leave
(:func:`conformance.stats.sample_outputs`). Every fully sampled request population is
G-tested twice, on the exact law of

* its first three generated tokens, and
* three *late* tokens -- tokens 14..16 of a 16-token run, or the last three before a
  context stop --

each jointly with the run's length (which carries EOS, stop-sequence, text-stop and
context stops), computed by dynamic programming over the target
(:func:`conformance.stats.exact_run_distribution`), independently of ``ssd_core``.

Engine cases (default tier):

* ``users``: the default :class:`~ssd_core.SSDConfig` (K = 4, fan-out budget 12,
  neural fallback, C = 1) under the default ``threaded`` driver, on a target whose
  tokenizer's EOS id stops generation; four kinds of request in every batch: default
  params (EOS stops), one with top-k, top-p, min-p, a draft temperature,
  ``ignore_eos`` and a text stop string, and two cheaper neighbours (T = 0.6 with
  top-k and a stop sequence; greedy) that run at 1/8 of the rate.
* ``auto``: K = 8, an integer budget 12 on a vocabulary of 4 with a poor draft (so
  the adaptive rule's F_0 exceeds V), Saguaro C = 0.5, ``fallback="auto"`` chosen from
  real measured times (not reproducible run to run), ``threaded``.
* ``context``: K = 5, fan-out 1 at every position, C = 0.1, fast (n-gram) fallback on
  the ``simulated`` clock with latency models; the target's context (20) ends every
  run, and one prompt is longer than the draft's context (12), so it runs target-only.
* ``fast-only``: budget 0 (no speculation cache): every round after the first
  verifies n-gram backup tokens as point masses, under the ``sequential`` driver.

The slow tier (``sd-sequential`` added, neighbours sampled fully) runs the same tests
at TV 0.02.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np

from backends.reference import ReferenceModel
from conformance.stats import (
    GTestResult,
    bonferroni,
    effective_params,
    exact_run_distribution,
    g_test,
    power_lower_bound,
    run_statistic,
    sample_outputs,
)
from ssd_core import LatencyModel, Metrics, RandomSource, SamplingParams, SSDConfig

#: Every G-test of the tier bins into at most this many bins (df <= 15).
MAX_BINS = 16
FAMILY_ALPHA = 1e-3
EARLY = (0, 1, 2)
LATE = (13, 14, 15)

#: Lines "test: figures" printed at the end of the run (tests/exactness/conftest.py).
REPORT: list[str] = []


# -- models ----------------------------------------------------------------------------


class LetterTokenizer:
    """A tokenizer stub: token ``i`` is the letter ``chr(97 + i)``; EOS ids as given."""

    def __init__(self, eos: Sequence[int]) -> None:
        self._eos = tuple(eos)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) - 97 for c in text]

    def decode(self, tokens: Sequence[int]) -> str:
        return "".join(chr(97 + int(t)) for t in tokens)


def _eos_shy(vocab: int, seed: int, peakedness: float, bias: float) -> ReferenceModel:
    """A random order-2 model whose token 0 (the EOS) is ``bias`` logits less likely."""
    base = ReferenceModel.random(vocab_size=vocab, order=2, seed=seed, peakedness=peakedness)

    def fn(context: tuple[int, ...]) -> np.ndarray:
        z = base.logits(context)
        z[0] -= bias
        return z

    return ReferenceModel.from_callable(fn, vocab_size=vocab, order=2, name="eos-shy")


def users_target() -> ReferenceModel:
    model = _eos_shy(5, seed=11, peakedness=1.5, bias=3.0)
    model.tokenizer = LetterTokenizer(eos=[0])  # type: ignore[misc]
    return model


def users_draft() -> ReferenceModel:
    return ReferenceModel.perturbed(users_target(), divergence=0.8)


def auto_target() -> ReferenceModel:
    return ReferenceModel.random(vocab_size=4, order=2, seed=12, peakedness=1.5)


def auto_draft() -> ReferenceModel:
    # A poor draft: the adaptive rule then puts most of the budget on F_0 (> V).
    return ReferenceModel.perturbed(auto_target(), divergence=1.5)


def context_target() -> ReferenceModel:
    return ReferenceModel.random(
        vocab_size=5,
        order=2,
        seed=13,
        peakedness=1.5,
        context_size=20,
        latency=LatencyModel.gpu_like(0.02),
        sleep=False,
    )


def context_draft() -> ReferenceModel:
    return ReferenceModel.perturbed(
        context_target(),
        divergence=0.8,
        context_size=12,
        latency=LatencyModel.gpu_like(0.004),
        sleep=False,
    )


def fast_target() -> ReferenceModel:
    return ReferenceModel.random(vocab_size=4, order=2, seed=14, peakedness=1.0)


def fast_draft() -> ReferenceModel:
    return ReferenceModel.perturbed(fast_target(), divergence=0.5)


# -- the cases ---------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Population:
    """One request (prompt and params), repeated, and the positions of its late test.

    ``exact`` replaces ``params`` on the exact side where the engine's rule has an
    equivalent in token ids (a text stop string of one-letter tokens is a stop
    sequence). A ``share`` below 1 makes it a cheap neighbour in the default tier: it
    runs in the same batches at ``share`` of the rate, every output is checked to be
    possible under the target, and it is G-tested only in the slow tier.
    """

    name: str
    prompt: tuple[int, ...]
    params: SamplingParams
    late: tuple[int, ...] = LATE
    exact: SamplingParams | None = None
    share: float = 1.0


@attrs.frozen(kw_only=True)
class EngineCase:
    """One running engine and the populations it serves together."""

    name: str
    make_target: Callable[[], ReferenceModel]
    make_draft: Callable[[], ReferenceModel]
    mode: str
    config: SSDConfig
    driver: str
    max_new_tokens: int
    populations: tuple[Population, ...]
    seed: int
    slow_only: bool = False


PROCESSORS: dict[str, Any] = dict(temperature=0.8, top_k=4, top_p=0.9, min_p=0.05)

ENGINES: dict[str, EngineCase] = {
    "users": EngineCase(
        name="users",
        make_target=users_target,
        make_draft=users_draft,
        mode="ssd",
        config=SSDConfig(),
        driver="threaded",
        max_new_tokens=16,
        seed=101,
        populations=(
            Population(name="defaults-eos", prompt=(1, 2), params=SamplingParams()),
            Population(
                name="processors-ignore-eos-text-stop",
                prompt=(2, 0, 1),
                params=SamplingParams(**PROCESSORS, draft_temperature=1.3, ignore_eos=True, stop=("dc",)),
                exact=SamplingParams(**PROCESSORS, stop_sequences=((3, 2),)),
            ),
            Population(
                name="T0.6-topk3-stopseq",
                prompt=(4,),
                params=SamplingParams(temperature=0.6, top_k=3, draft_temperature=1.0, stop_sequences=((1, 1),)),
                share=0.125,
            ),
            Population(
                name="greedy",
                prompt=(3, 4),
                params=SamplingParams(temperature=0.0, ignore_eos=True),
                share=0.125,
            ),
        ),
    ),
    "auto": EngineCase(
        name="auto",
        make_target=auto_target,
        make_draft=auto_draft,
        mode="ssd",
        config=SSDConfig(k=8, fanout=12, saguaro_c=0.5, fallback="auto"),
        driver="threaded",
        max_new_tokens=16,
        seed=202,
        populations=(Population(name="T1", prompt=(1, 2), params=SamplingParams()),),
    ),
    "context": EngineCase(
        name="context",
        make_target=context_target,
        make_draft=context_draft,
        mode="ssd",
        config=SSDConfig(k=5, fanout=(1, 1, 1, 1, 1, 1), saguaro_c=0.1, fallback="fast"),
        driver="simulated",
        max_new_tokens=32,
        seed=303,
        populations=(
            # 20 - 4 + 1 = 17 tokens before the target's context is full.
            Population(name="context-stop", prompt=(1, 2, 3, 4), params=SamplingParams(), late=(14, 15, 16)),
            # 13 prompt tokens: more than the draft's context holds -> target-only, 8 tokens.
            Population(
                name="prompt-beyond-draft",
                prompt=(0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2),
                params=SamplingParams(top_p=0.9),
                late=(5, 6, 7),
            ),
        ),
    ),
    "fast-only": EngineCase(
        name="fast-only",
        make_target=fast_target,
        make_draft=fast_draft,
        mode="ssd",
        config=SSDConfig(k=2, fanout=0, fallback="fast"),
        driver="sequential",
        max_new_tokens=16,
        seed=505,
        populations=(Population(name="T1", prompt=(1, 2), params=SamplingParams()),),
    ),
    "sd-sequential": EngineCase(
        name="sd-sequential",
        make_target=users_target,
        make_draft=users_draft,
        mode="sd",
        config=SSDConfig(k=6),
        driver="sequential",
        max_new_tokens=16,
        seed=404,
        populations=(Population(name="defaults-eos", prompt=(1, 2), params=SamplingParams()),),
        slow_only=True,
    ),
}  # fmt: skip

DEFAULT_ENGINES = tuple(n for n, e in ENGINES.items() if not e.slow_only)

#: The batch-independence test (pairs of sequences with the same request): its own
#: engine, whose draft equals the target so that shared speculations would show.
PAIRS_VOCAB = 3
PAIRS_POSITION = (3,)


def pairs_target() -> ReferenceModel:
    return ReferenceModel.random(vocab_size=PAIRS_VOCAB, order=2, seed=15, peakedness=1.0)


def pairs_draft() -> ReferenceModel:
    return ReferenceModel.perturbed(pairs_target(), divergence=0.0)


PAIRS = EngineCase(
    name="pairs",
    make_target=pairs_target,
    make_draft=pairs_draft,
    mode="ssd",
    config=SSDConfig(k=2, fanout=(PAIRS_VOCAB,) * 3, fallback="neural"),
    driver="sequential",
    # Room for a second speculation after the first round (a speculation is never
    # longer than what the sequence can still commit).
    max_new_tokens=6,
    seed=606,
    populations=(
        Population(name="a", prompt=(1, 2), params=SamplingParams()),
        Population(name="b", prompt=(1, 2), params=SamplingParams()),
    ),
)


# -- the families, their sizes and their power -------------------------------------------

#: Default tier: two tests per fully sampled population of the default engines, and
#: the batch-independence test.
FAMILY_SIZE = 2 * sum(p.share == 1.0 for n in DEFAULT_ENGINES for p in ENGINES[n].populations) + 1
ALPHA = bonferroni(FAMILY_ALPHA, FAMILY_SIZE)
EFFECT_TV = 0.05
#: required_samples(15, ALPHA, 0.05) = 4864 (power >= 0.9 at binned TV 0.05, df <= 15).
SAMPLES = 4900
#: required_samples(8, ALPHA, 0.05) = 4096 (9 cells).
PAIR_SAMPLES = 4100

#: Slow tier: every population of every engine, two tests each.
SLOW_FAMILY_SIZE = 2 * sum(len(e.populations) for e in ENGINES.values())
SLOW_ALPHA = bonferroni(FAMILY_ALPHA, SLOW_FAMILY_SIZE)
SLOW_EFFECT_TV = 0.02
#: required_samples(15, SLOW_ALPHA, 0.02) = 30720.
SLOW_SAMPLES = 31_000


def stated_power(samples: int, alpha: float, effect_tv: float, df: int = MAX_BINS - 1) -> float:
    """The power each test of a family is stated with: against any alternative at
    binned TV >= ``effect_tv`` with ``df`` degrees of freedom (a test that ends up
    with fewer bins has more power at the same binned TV)."""
    return power_lower_bound(samples, df, alpha, effect_tv)


# -- running a case ----------------------------------------------------------------------


def budget(case: EngineCase, target: Any, prompt: Sequence[int]) -> int:
    """Tokens a run can generate: the budget, or the target's context (C + 1 tokens
    fill it: a handle holds all but the last committed token)."""
    ctx = getattr(target, "context_size", None)
    limit = case.max_new_tokens
    if ctx is not None:
        limit = min(limit, ctx + 1 - len(prompt))
    return limit


def exact_law(
    case: EngineCase, pop: Population, positions: Sequence[int], target: Any = None
) -> dict[Any, float]:
    """The exact law of (tokens at ``positions``, length) for one population."""
    target = target if target is not None else case.make_target()
    return exact_run_distribution(
        target.logits,
        pop.prompt,
        effective_params(target, pop.exact or pop.params),
        max_new=budget(case, target, pop.prompt),
        order=2,
        positions=positions,
        with_length=True,
    )


def windows(pop: Population) -> dict[str, tuple[int, ...]]:
    return {"first": EARLY, "late": pop.late}


def counts_of(outputs: Sequence[Sequence[int]], positions: Sequence[int]) -> dict[Any, int]:
    counts: dict[Any, int] = {}
    for toks in outputs:
        key = run_statistic(toks, positions, with_length=True)
        counts[key] = counts.get(key, 0) + 1
    return counts


def sample_case(
    case: EngineCase,
    *,
    samples: int,
    full_shares: bool = False,
    populations: Sequence[str] | None = None,
    wrap_source: Callable[[RandomSource], RandomSource] | None = None,
    on_metrics: Callable[[Metrics], None] | None = None,
) -> dict[str, list[tuple[int, ...]]]:
    """Outputs of every population of ``case`` (or of those named) from one running
    engine: ``samples`` each, ``share * samples`` for neighbours unless ``full_shares``."""
    pops = [p for p in case.populations if populations is None or p.name in populations]
    outputs = sample_outputs(
        case.make_target,
        case.make_draft,
        [(p.prompt, p.params) for p in pops],
        repeats=[samples if full_shares else max(1, round(samples * p.share)) for p in pops],
        max_new_tokens=case.max_new_tokens,
        mode=case.mode,
        config=case.config,
        driver=case.driver,
        seed=case.seed,
        wrap_source=wrap_source,
        on_metrics=on_metrics,
    )
    return {p.name: outs for p, outs in zip(pops, outputs, strict=True)}


def g_tests(
    case: EngineCase,
    outputs: dict[str, list[tuple[int, ...]]],
    *,
    alpha: float,
    effect_tv: float,
    samples: int,
    record: bool = True,
) -> dict[str, GTestResult]:
    """G-test the first and late tokens of every population sampled ``samples`` times,
    and (``record``) keep each result, with its power, for the end-of-run report."""
    target = case.make_target()
    results = {}
    for pop in case.populations:
        outs = outputs.get(pop.name)
        if outs is None or len(outs) < samples:
            continue
        for label, positions in windows(pop).items():
            law = exact_law(case, pop, positions, target)
            res = g_test(
                counts_of(outs, positions), law, alpha=alpha, effect_tv=effect_tv, max_bins=MAX_BINS
            )
            name = f"{case.name}/{pop.name}/{label}{list(positions)}"
            results[name] = res
            if record:
                REPORT.append(f"{name}: {res.summary()}")
    return results
