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

from ssd_core import RandomSource, SamplingParams, SeededSource, SSDConfig, generate

from .exact import LogitsFn, processed_probs

__all__ = [
    "GTestResult",
    "exact_prefix_distribution",
    "g_test",
    "make_bins",
    "power_lower_bound",
    "required_samples",
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
