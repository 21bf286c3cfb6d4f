"""Statistical exactness tests where enumeration cannot reach.

A G-test of the first ``m`` generated tokens against the processed target's exact
distribution of those tokens, with:

* a stated sample size and fixed seeds (reproducible);
* a per-test significance level ``alpha = family_alpha / family_size`` (Bonferroni),
  so the whole family's false-alarm probability is at most ``family_alpha``;
* a *computed* power: against every alternative whose total-variation distance from
  the target on the test's bins is at least ``effect_tv``, the noncentrality of the
  G statistic is at least ``4 n effect_tv**2`` (chi-square divergence >= 4 TV^2), so
  ``P(noncentral chi2(df, 4 n tv^2) > critical value)`` is a lower bound on the power
  (asymptotic approximation).

The helpers take model *factories* (zero-argument callables returning a fresh model)
so backend test suites reuse them unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np

from ssd_core import (
    Engine,
    Metrics,
    RandomSource,
    RequestHandle,
    SamplingParams,
    SeededSource,
    SSDConfig,
    generate,
)

from .exact import LogitsFn, _stops, processed_probs

__all__ = [
    "GTestResult",
    "draw_pairs_test",
    "exact_prefix_distribution",
    "exact_run_distribution",
    "g_test",
    "make_bins",
    "output_probability",
    "power_lower_bound",
    "required_samples",
    "run_statistic",
    "sample_outputs",
    "sample_prefixes",
    "statistical_lossless_test",
]


@attrs.frozen(kw_only=True)
class GTestResult:
    """One G-test.

    Attributes:
        statistic: the G statistic ``2 sum O ln(O / E)``.
        df: degrees of freedom (bins - 1).
        p_value: its upper-tail chi-square p-value.
        alpha: the per-test significance level (after Bonferroni).
        samples: the sample size n.
        bins: number of bins.
        effect_tv: the effect size the power is stated for (TV on the bins).
        power: lower bound on the power against any alternative with binned TV >= effect_tv.
        observed_tv: TV between the empirical and the exact binned distributions.
    """

    statistic: float
    df: int
    p_value: float
    alpha: float
    samples: int
    bins: int
    effect_tv: float
    power: float
    observed_tv: float

    @property
    def rejected(self) -> bool:
        """Whether the test rejects exactness at level :attr:`alpha`."""
        return self.p_value < self.alpha

    def summary(self) -> str:
        """One line with the figures."""
        return (
            f"G={self.statistic:.1f} df={self.df} p={self.p_value:.2e} alpha={self.alpha:.1e} "
            f"n={self.samples} TV_obs={self.observed_tv:.4f} power(TV>={self.effect_tv})={self.power:.3f}"
        )


def exact_prefix_distribution(
    fn: LogitsFn, prompt: Sequence[int], params: SamplingParams, m: int
) -> dict[tuple[int, ...], float]:
    """The exact distribution of the first ``m`` generated tokens (shorter if a stop
    token or stop sequence ends the sequence first) under the processed target.

    Args:
        fn: the target's logits function.
        prompt: the prompt.
        params: the sampling parameters (processing and stops).
        m: how many leading tokens.

    Returns:
        prefix -> probability (zero-probability prefixes left out).
    """
    out: dict[tuple[int, ...], float] = {}
    prompt = tuple(int(t) for t in prompt)

    def walk(ctx: tuple[int, ...], gen: tuple[int, ...], prob: float) -> None:
        if len(gen) == m:
            out[gen] = prob
            return
        p = processed_probs(fn(ctx), params)
        for t in map(int, np.flatnonzero(p > 0)):
            g2 = gen + (t,)
            c2 = ctx + (t,)
            stop = (params.stop_token_ids and t in params.stop_token_ids) or any(
                len(g2) >= len(s) and c2[-len(s) :] == s for s in params.stop_sequences
            )
            if stop:
                out[g2] = out.get(g2, 0.0) + prob * float(p[t])
            else:
                walk(c2, g2, prob * float(p[t]))

    walk(prompt, (), 1.0)
    return out


def make_bins(
    probs: dict[Any, float], n: int, *, max_bins: int = 32, min_expected: float = 5.0
) -> list[list[Any]]:
    """Group outcomes into bins for a G-test with ``n`` samples.

    The likeliest outcomes get a bin each (while their expected count is at least
    ``min_expected`` and at most ``max_bins // 2`` of them); the rest are pooled, in
    order of probability, into groups of about equal mass, each with expected count at
    least ``min_expected``. Outcomes never seen under the target are not binned: an
    observation outside the support fails the test outright (see :func:`g_test`).

    Returns:
        The bins, each a list of outcomes.
    """
    items = sorted(probs.items(), key=lambda kv: (-kv[1], kv[0]))
    bins: list[list[Any]] = []
    i = 0
    while i < len(items) and len(bins) < max_bins // 2 and items[i][1] * n >= min_expected:
        bins.append([items[i][0]])
        i += 1
    rest = items[i:]
    rest_mass = sum(p for _, p in rest)
    if rest:
        groups = max(1, min(max_bins - len(bins), int(rest_mass * n // min_expected)))
        target_mass = rest_mass / groups
        cur: list[Any] = []
        acc = 0.0
        for k, p in rest:
            cur.append(k)
            acc += p
            if acc >= target_mass and len(bins) < max_bins - 1:
                bins.append(cur)
                cur, acc = [], 0.0
        if cur:
            if bins and acc * n < min_expected:
                bins[-1].extend(cur)
            else:
                bins.append(cur)
    return bins


def power_lower_bound(n: int, df: int, alpha: float, tv: float) -> float:
    """Power of a level-``alpha`` chi-square-type test with ``df`` degrees of freedom and
    ``n`` samples against the least favourable alternative at binned TV distance ``tv``.

    Uses chi-square divergence >= 4 TV^2, so the noncentrality is >= 4 n tv^2.
    """
    from scipy.stats import chi2, ncx2

    crit = chi2.isf(alpha, df)
    return float(ncx2.sf(crit, df, 4.0 * n * tv * tv))


def required_samples(df: int, alpha: float, tv: float, power: float = 0.9) -> int:
    """The smallest n (to 1%) whose :func:`power_lower_bound` reaches ``power``."""
    lo, hi = 1, 1
    while power_lower_bound(hi, df, alpha, tv) < power:
        hi *= 2
    while hi - lo > max(1, hi // 100):
        mid = (lo + hi) // 2
        if power_lower_bound(mid, df, alpha, tv) >= power:
            hi = mid
        else:
            lo = mid
    return hi


def g_test(
    counts: dict[Any, int],
    probs: dict[Any, float],
    *,
    alpha: float,
    effect_tv: float = 0.02,
    max_bins: int = 32,
) -> GTestResult:
    """G-test of observed ``counts`` against the exact distribution ``probs``.

    Any observation outside the support of ``probs`` is an impossible outcome under
    the target; the test then reports ``statistic = inf`` and ``p_value = 0``.

    Args:
        counts: outcome -> how many times it was observed.
        probs: the exact distribution.
        alpha: per-test significance level.
        effect_tv: the effect size the reported power refers to.
        max_bins: at most this many bins.

    Returns:
        The :class:`GTestResult`.
    """
    from scipy.stats import chi2

    n = int(sum(counts.values()))
    impossible = sum(c for k, c in counts.items() if probs.get(k, 0.0) <= 0.0)
    bins = make_bins(probs, n, max_bins=max_bins)
    df = max(len(bins) - 1, 1)
    obs = np.array([sum(counts.get(k, 0) for k in b) for b in bins], dtype=np.float64)
    exp = np.array([sum(probs[k] for k in b) for b in bins], dtype=np.float64) * n
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(obs > 0, obs * np.log(obs / exp), 0.0)
    g = math.inf if impossible else float(2.0 * terms.sum())
    p_value = 0.0 if impossible else float(chi2.sf(g, df))
    observed_tv = 0.5 * float(np.abs(obs / max(n, 1) - exp / max(n, 1)).sum()) + impossible / max(
        n, 1
    )
    return GTestResult(
        statistic=g,
        df=df,
        p_value=p_value,
        alpha=alpha,
        samples=n,
        bins=len(bins),
        effect_tv=effect_tv,
        power=power_lower_bound(n, df, alpha, effect_tv),
        observed_tv=observed_tv,
    )


def sample_prefixes(
    make_target: Callable[[], Any],
    make_draft: Callable[[], Any] | None,
    *,
    prompt: Sequence[int],
    params: SamplingParams,
    mode: str,
    config: SSDConfig | None,
    m: int,
    samples: int,
    seed: int,
    batch: int = 256,
    wrap_source: Callable[[RandomSource], RandomSource] | None = None,
    driver: str = "sequential",
) -> dict[tuple[int, ...], int]:
    """Counts of the first ``m`` generated tokens over ``samples`` independent runs.

    Runs are batched: one :func:`ssd_core.generate` call generates ``batch`` copies of
    the prompt (each sequence's draws are keyed by its index, so they are independent).

    Args:
        make_target / make_draft: model factories (called once each).
        prompt: the prompt.
        params: sampling parameters.
        mode: ``"ar"``, ``"sd"`` or ``"ssd"``.
        config: the SSD configuration.
        m: tokens per sample.
        samples: the sample size.
        seed: the base seed (call ``i`` uses ``seed + i``).
        batch: prompts per call.
        wrap_source: optional wrapper around each call's seeded source (tests use it
            to inject deliberately lossy samplers).
        driver: the ssd_core driver.

    Returns:
        prefix -> count.
    """
    target = make_target()
    draft = make_draft() if make_draft is not None and mode != "ar" else None
    batch = min(batch, _batch_limit(target, draft, mode, config))
    params = effective_params(target, params)
    counts: dict[tuple[int, ...], int] = {}
    done = 0
    call = 0
    while done < samples:
        b = min(batch, samples - done)
        src: RandomSource = SeededSource(seed + call)
        if wrap_source is not None:
            src = wrap_source(src)
        res = generate(
            target,
            draft,
            prompts=[list(prompt)] * b,
            mode=mode,
            max_new_tokens=m,
            sampling=params,
            config=config,
            driver=driver,
            source=src,
        )
        for toks in res.tokens:
            key = tuple(toks[:m])
            counts[key] = counts.get(key, 0) + 1
        done += b
        call += 1
    return counts


def effective_params(target: Any, params: SamplingParams) -> SamplingParams:
    """``params`` with the stop ids the engine will really use made explicit: with
    ``stop_token_ids=None`` generation stops on the target tokenizer's EOS ids, and the
    exact distribution must stop there too."""
    tokenizer = getattr(target, "tokenizer", None)
    if params.stop_token_ids is not None or params.ignore_eos or tokenizer is None:
        return params
    return attrs.evolve(params, stop_token_ids=tuple(getattr(tokenizer, "eos_token_ids", ()) or ()))


def _batch_limit(target: Any, draft: Any, mode: str, config: SSDConfig | None) -> int:
    """The largest batch the models' declared handle limits (``max_handles``) allow."""
    limit = 1 << 30
    t_max = getattr(target, "max_handles", None)
    if isinstance(t_max, int):
        limit = min(limit, t_max)
    d_max = getattr(draft, "max_handles", None)
    if draft is not None and isinstance(d_max, int):
        per_seq = 1
        if mode == "ssd":
            cfg = config or SSDConfig()
            sizes = [
                f if isinstance(f, int) else sum(f)
                for f in (cfg.fanout, cfg.fanout_after_backup)
                if f is not None
            ]
            per_seq += max(sizes)
        limit = min(limit, d_max // per_seq)
    return max(limit, 1)


def statistical_lossless_test(
    make_target: Callable[[], Any],
    make_draft: Callable[[], Any] | None,
    target_logits: LogitsFn,
    *,
    prompt: Sequence[int],
    params: SamplingParams,
    mode: str,
    config: SSDConfig | None,
    m: int,
    samples: int,
    seed: int,
    alpha: float,
    effect_tv: float = 0.02,
    max_bins: int = 32,
    wrap_source: Callable[[RandomSource], RandomSource] | None = None,
    batch: int = 256,
) -> GTestResult:
    """Sample the machine and G-test its first ``m`` tokens against the exact target.

    Args:
        make_target / make_draft: model factories for the run.
        target_logits: the target's exact logits function (for the exact distribution).
        prompt, params, mode, config, m, samples, seed, batch, wrap_source: as for
            :func:`sample_prefixes`.
        alpha: per-test level (Bonferroni-corrected by the caller).
        effect_tv, max_bins: as for :func:`g_test`.

    Returns:
        The :class:`GTestResult`.
    """
    if params.stop_token_ids is None and not params.ignore_eos:
        # The engine stops on the target tokenizer's EOS ids; so must the exact side.
        probe = make_target()
        params = effective_params(probe, params)
        free = getattr(probe, "free", None)
        if callable(free):
            free()
    probs = exact_prefix_distribution(target_logits, prompt, params, m)
    counts = sample_prefixes(
        make_target,
        make_draft,
        prompt=prompt,
        params=params,
        mode=mode,
        config=config,
        m=m,
        samples=samples,
        seed=seed,
        wrap_source=wrap_source,
        batch=batch,
    )
    return g_test(counts, probs, alpha=alpha, effect_tv=effect_tv, max_bins=max_bins)


def bonferroni(family_alpha: float, family_size: int) -> float:
    """Per-test level giving family-wise false alarm <= ``family_alpha``."""
    return family_alpha / max(family_size, 1)


# -- whole runs: late positions, lengths, mixed batches --------------------------------


def run_statistic(
    tokens: Sequence[int], positions: Sequence[int], *, with_length: bool = False
) -> Any:
    """The statistic :func:`exact_run_distribution` gives the law of, for one output.

    Args:
        tokens: the generated tokens of one run.
        positions: 0-based positions of the generated tokens to keep (a run that ended
            earlier keeps only those it has).
        with_length: pair them with the number of generated tokens.

    Returns:
        ``tokens at positions`` (a tuple), or ``(that tuple, length)``.
    """
    window = tuple(int(tokens[i]) for i in positions if i < len(tokens))
    return (window, len(tokens)) if with_length else window


def exact_run_distribution(
    fn: LogitsFn,
    prompt: Sequence[int],
    params: SamplingParams,
    *,
    max_new: int,
    order: int,
    positions: Sequence[int],
    with_length: bool = False,
) -> dict[Any, float]:
    """The exact law of :func:`run_statistic` under autoregressive sampling from the
    processed target, by dynamic programming over the target's Markov state.

    Exact for a target whose logits depend only on the last ``order`` tokens of the
    context (a :class:`~backends.reference.ReferenceModel` of that order): the state
    after each step is the context's last ``max(order, longest stop sequence)`` tokens
    and the tokens recorded so far, so late positions of long runs cost
    ``O(max_new * V^(order + len(positions)) * V)`` instead of ``V^max_new``. The same
    stop rules as :func:`~conformance.exact.target_distribution` (stop ids and stop
    sequences, kept in the output; the budget ``max_new`` -- pass the context limit
    into it when the target's context is what ends the run).

    Args:
        fn: the target's logits function.
        prompt: the prompt (at least ``order`` tokens keeps the state exact from the start).
        params: sampling parameters (processing and stops; tokenizer EOS is not
            consulted: pass stop ids explicitly, see :func:`effective_params`).
        max_new: the generation budget.
        order: the target's Markov order.
        positions: the 0-based generated positions the statistic keeps.
        with_length: include the run's length in the statistic.

    Returns:
        statistic -> probability (zero-probability outcomes left out).
    """
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    keep = frozenset(int(i) for i in positions)
    tail_len = max([order, *(len(seq) for seq in params.stop_sequences)])
    rows: dict[tuple[int, ...], np.ndarray] = {}
    live: dict[tuple[tuple[int, ...], tuple[int, ...]], float] = {
        (tuple(int(t) for t in prompt)[-tail_len:], ()): 1.0
    }
    out: dict[Any, float] = {}

    def emit(rec: tuple[int, ...], length: int, prob: float) -> None:
        key = (rec, length) if with_length else rec
        out[key] = out.get(key, 0.0) + prob

    for step in range(max_new):
        nxt: dict[tuple[tuple[int, ...], tuple[int, ...]], float] = {}
        for (tail, rec), prob in live.items():
            p = rows.get(tail)
            if p is None:
                p = rows[tail] = processed_probs(fn(tail), params)
            for t in map(int, np.flatnonzero(p > 0)):
                pt = prob * float(p[t])
                rec2 = rec + (t,) if step in keep else rec
                ctx = tail + (t,)
                if _stops(ctx, step + 1, params):
                    emit(rec2, step + 1, pt)
                else:
                    key = (ctx[-tail_len:], rec2)
                    nxt[key] = nxt.get(key, 0.0) + pt
        live = nxt
    for (_tail, rec), prob in live.items():
        emit(rec, max_new, prob)
    return out


def output_probability(
    fn: LogitsFn,
    prompt: Sequence[int],
    params: SamplingParams,
    tokens: Sequence[int],
    *,
    max_new: int,
) -> float:
    """The probability that autoregressive sampling from the processed target
    generates exactly ``tokens`` (and then ends): 0 for an impossible output --
    a token outside the processed support, a run that goes on past a stop, or one
    that ends early without a stop.

    Args:
        fn: the target's logits function (called with the whole context).
        prompt, params: as for :func:`exact_prefix_distribution`.
        tokens: the generated tokens.
        max_new: the generation budget (context limit included).
    """
    ctx = tuple(int(t) for t in prompt)
    prob = 1.0
    for i, t in enumerate(int(x) for x in tokens):
        p = processed_probs(fn(ctx), params)
        if not 0 <= t < p.shape[0] or p[t] <= 0.0:
            return 0.0
        prob *= float(p[t])
        ctx = ctx + (t,)
        if _stops(ctx, i + 1, params):
            return prob if i + 1 == len(tokens) else 0.0
    return prob if len(tokens) == max_new else 0.0


def sample_outputs(
    make_target: Callable[[], Any],
    make_draft: Callable[[], Any] | None,
    requests: Sequence[tuple[Sequence[int], SamplingParams]],
    *,
    repeats: int | Sequence[int],
    max_new_tokens: int,
    mode: str,
    config: SSDConfig | None,
    seed: int,
    driver: str = "threaded",
    max_batch: int = 256,
    wrap_source: Callable[[RandomSource], RandomSource] | None = None,
    check_unique: bool = True,
    on_draft_error: str = "raise",
    on_metrics: Callable[[Metrics], None] | None = None,
) -> list[list[tuple[int, ...]]]:
    """``repeats`` independent outputs of every request, from one running
    :class:`~ssd_core.Engine` -- mixed batches, requests joining as others leave, the
    real seeded random source.

    The requests are submitted interleaved (request 0, 1, ..., then again), in chunks
    of at most ``max_batch``; the engine runs ``max_batch`` at a time and admits the
    next as one finishes, so every batch mixes every request's parameters. Every draw
    comes from one ``SeededSource(seed, check_unique=...)`` (each request its own
    stream), so a repeated draw name raises instead of silently correlating two draws;
    a draft-lane fault raises (``on_draft_error="raise"``) instead of degrading to
    target-only, which would hide it.

    Args:
        make_target / make_draft: model factories (called once each).
        requests: ``(prompt, params)`` pairs.
        repeats: outputs per request (one count for all, or one per request; a
            request with fewer repeats is spread evenly among the others).
        max_new_tokens: the budget of every request.
        mode, config, driver: as for the :class:`~ssd_core.Engine`.
        seed: the source's seed.
        max_batch: requests generating at once.
        wrap_source: optional wrapper around the source (negative controls).
        check_unique: turn on the source's repeated-name check.
        on_draft_error: as for the engine.
        on_metrics: called with the engine's :class:`~ssd_core.Metrics` at the end
            (e.g. to check which fallbacks ``"auto"`` chose).

    Returns:
        For each request, its ``repeats`` outputs (generated tokens).
    """
    target = make_target()
    draft = make_draft() if make_draft is not None and mode != "ar" else None
    src: RandomSource = SeededSource(seed, check_unique=check_unique)
    if wrap_source is not None:
        src = wrap_source(src)
    counts = [repeats] * len(requests) if isinstance(repeats, int) else list(repeats)
    if len(counts) != len(requests):
        raise ValueError(f"{len(counts)} repeat counts for {len(requests)} requests")
    # Interleave: request i's j-th copy sits at (j + 1/2) / counts[i] of the way along.
    order = [
        i for _, i in sorted(((j + 0.5) / c, i) for i, c in enumerate(counts) for j in range(c))
    ]
    outputs: list[list[tuple[int, ...]]] = [[] for _ in requests]
    with Engine(
        target,
        draft,
        mode=mode,
        config=config,
        driver=driver,
        source=src,
        on_draft_error=on_draft_error,
        max_batch=max_batch,
    ) as engine:
        handles: list[tuple[int, RequestHandle]] = []
        step = max(1, min(max_batch, engine.capacity))  # the models' handle limits too
        for lo in range(0, len(order), step):
            chunk = order[lo : lo + step]
            hs = engine.submit_many(
                [list(requests[i][0]) for i in chunk],
                sampling=[requests[i][1] for i in chunk],
                max_new_tokens=max_new_tokens,
            )
            handles.extend(zip(chunk, hs, strict=True))
        for i, h in handles:
            outputs[i].append(tuple(h.result().tokens))
        if on_metrics is not None:
            on_metrics(engine.metrics())
    return outputs


def draw_pairs_test(
    source: RandomSource,
    pairs: Sequence[tuple[Any, Any]],
    *,
    categories: int = 8,
    alpha: float,
    effect_tv: float = 0.05,
    kind: str = "categorical",
) -> GTestResult:
    """G-test that two draws with distinct names are independent and uniform.

    Each pair of keys is drawn once through the source's public interface: a
    categorical draw over ``categories`` equally weighted outcomes (or, with
    ``kind="bernoulli"``, a fair coin, ``categories`` = 2) per key. Under a correct
    source the pair is uniform on ``categories ** 2`` cells; a source that correlates
    related names (or reuses one uniform for both) is not.

    Args:
        source: the random source (a fresh one: every key is drawn once).
        pairs: ``(key_a, key_b)`` pairs, all keys distinct.
        categories: outcomes per draw.
        alpha: the per-test level.
        effect_tv: the TV the stated power refers to.
        kind: ``"categorical"`` or ``"bernoulli"``.

    Returns:
        The :class:`GTestResult` over the ``categories ** 2`` cells.
    """
    if kind == "bernoulli":
        categories = 2
        a = source.bernoulli([k for k, _ in pairs], [0.5] * len(pairs))
        b = source.bernoulli([k for _, k in pairs], [0.5] * len(pairs))
        xa, xb = [int(x) for x in a], [int(x) for x in b]
    elif kind == "categorical":
        w = np.ones((len(pairs), categories))
        xa = source.categorical([k for k, _ in pairs], w)
        xb = source.categorical([k for _, k in pairs], w)
    else:
        raise ValueError(f"kind must be 'categorical' or 'bernoulli', got {kind!r}")
    counts: dict[Any, int] = {}
    for u, v in zip(xa, xb, strict=True):
        counts[(u, v)] = counts.get((u, v), 0) + 1
    cell = 1.0 / (categories * categories)
    probs = {(u, v): cell for u in range(categories) for v in range(categories)}
    return g_test(
        counts, probs, alpha=alpha, effect_tv=effect_tv, max_bins=categories * categories + 1
    )
