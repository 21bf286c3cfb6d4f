"""``check_lossless``: the lossless half of the conformance suite.

Given factories for a target and a draft model (any backend), it checks, each as one
report row:

1. greedy identity: AR, SD and SSD (neural and fast fallback) produce the same tokens
   at temperature 0;
2. exact enumeration (optional, ``exact_ids``): the backend's models restricted to a
   handful of token ids (:func:`conformance.exact.restrict_vocab`) are enumerated
   exactly in SD and SSD and compared with the restricted target, to 1e-9;
3. statistical tests: for every mode and every sampling processor, a G-test of the
   first ``m`` tokens against the exact processed target, Bonferroni-corrected so the
   family's false-alarm probability is at most ``family_alpha``; each row reports the
   statistic, p-value and the computed power for ``effect_tv``.

It does not import pytest; rows are :class:`conformance._report.CheckResult`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from ssd_core import ConfigError, SamplingParams, SSDConfig, generate

from ._report import CheckResult, Report, Status
from ._watchdog import DEFAULT_TIMEOUT, CheckTimeout, call_with_timeout
from .exact import compare_exact, logits_fn_of, restrict_vocab
from .stats import bonferroni, power_lower_bound, required_samples, statistical_lossless_test

__all__ = [
    "DEFAULT_MODES",
    "DEFAULT_PROCESSORS",
    "QUICK_MODES",
    "QUICK_PROCESSORS",
    "check_lossless",
    "lossless_plan",
    "planned_power",
]

#: name -> (mode, config) for the statistical family.
DEFAULT_MODES: dict[str, tuple[str, SSDConfig | None]] = {
    "ar": ("ar", None),
    "sd": ("sd", SSDConfig(k=3)),
    "ssd-neural": ("ssd", SSDConfig(k=3, fanout=(2, 1, 1, 2), fallback="neural", saguaro_c=0.5)),
    "ssd-fast": ("ssd", SSDConfig(k=3, fanout=(2, 1, 1, 2), fallback="fast")),
}

#: name -> sampling parameters for the statistical family.
DEFAULT_PROCESSORS: dict[str, SamplingParams] = {
    "T1": SamplingParams(temperature=1.0),
    "T0.5-topk5": SamplingParams(temperature=0.5, top_k=5),
    "topp0.8": SamplingParams(temperature=1.0, top_p=0.8),
    "minp0.05": SamplingParams(temperature=1.0, min_p=0.05),
    "T2-topk20-draftT0.7": SamplingParams(temperature=2.0, top_k=20, draft_temperature=0.7),
}


#: The modes, processors and bins of ``--quick``: fewer, coarser tests with more
#: samples each, so every test has real power (see :func:`lossless_plan`).
QUICK_MODES = ("sd", "ssd-neural", "ssd-fast")
QUICK_PROCESSORS = ("T1",)
QUICK_BINS = 6
FULL_BINS = 16

#: Below this planned power per test a run is labelled a smoke test.
SMOKE_POWER = 0.9


def _row(name: str, ok: bool, figure: str, message: str, t0: float) -> CheckResult:
    return CheckResult(
        name=name,
        status=Status.PASSED if ok else Status.FAILED,
        measured=figure,
        message="" if ok else message,
        seconds=time.perf_counter() - t0,
    )


def _error_row(name: str, exc: BaseException, t0: float) -> CheckResult:
    return CheckResult(
        name=name,
        status=Status.FAILED,
        measured="",
        message=f"raised {type(exc).__name__}: {exc}",
        seconds=time.perf_counter() - t0,
    )


def planned_power(
    samples: int, family_size: int, *, family_alpha: float, effect_tv: float, max_bins: int
) -> float:
    """The power each statistical test of a family has, at least, before it runs.

    A test with fewer bins than ``max_bins`` (a peaked target) has fewer degrees of
    freedom and so more power; this is the bound for the worst case.

    Args:
        samples: samples per test.
        family_size: tests in the Bonferroni family.
        family_alpha: family-wise false-alarm bound.
        effect_tv: the binned total-variation distance the power refers to.
        max_bins: bins per test.

    Returns:
        The lower bound on each test's power against any alternative at binned TV >=
        ``effect_tv`` (asymptotic; see :func:`conformance.stats.power_lower_bound`).
    """
    alpha = bonferroni(family_alpha, family_size)
    return power_lower_bound(samples, max(max_bins - 1, 1), alpha, effect_tv)


def lossless_plan(
    *,
    quick: bool = True,
    samples: int | None = None,
    modes: Sequence[str] | None = None,
    processors: Sequence[str] | None = None,
    max_bins: int | None = None,
    family_alpha: float = 1e-4,
    effect_tv: float = 0.05,
    power: float = SMOKE_POWER,
) -> dict[str, Any]:
    """Keyword arguments for :func:`check_lossless`: which tests, and how many samples.

    ``quick`` runs SD, SSD-neural and SSD-fast at temperature 1 with 6 bins; full runs
    every mode of :data:`DEFAULT_MODES` under every processor of
    :data:`DEFAULT_PROCESSORS` with 16 bins. Unless ``samples`` is given, each test gets
    the samples that give it ``power`` against a binned TV of ``effect_tv``, rounded up
    to a hundred (quick: 4,000 per test, 3 tests, as many samples in all as the
    8 x 1,500 smoke test it replaces, whose power was 0.03; full: 5,800 per test, 20
    tests).

    Args:
        quick: the short plan (the CLI's ``--quick``) or the long one.
        samples: samples per test; ``None``: enough for ``power``.
        modes: names from :data:`DEFAULT_MODES`; ``None``: the plan's.
        processors: names from :data:`DEFAULT_PROCESSORS`; ``None``: the plan's.
        max_bins: bins per test; ``None``: 6 quick, 16 full.
        family_alpha: family-wise false-alarm bound.
        effect_tv: the binned TV the power refers to.
        power: the power ``samples=None`` aims for.

    Returns:
        ``modes``, ``processors``, ``samples``, ``max_bins``, ``family_alpha`` and
        ``effect_tv``, ready for ``check_lossless(make_target, make_draft, **plan)``.

    Raises:
        ConfigError: an unknown mode or processor name, or a bad number.
    """
    mode_names = (
        list(modes) if modes is not None else (list(QUICK_MODES) if quick else list(DEFAULT_MODES))
    )
    proc_names = (
        list(processors)
        if processors is not None
        else (list(QUICK_PROCESSORS) if quick else list(DEFAULT_PROCESSORS))
    )
    for kind, names, known in (
        ("mode", mode_names, DEFAULT_MODES),
        ("processor", proc_names, DEFAULT_PROCESSORS),
    ):
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise ConfigError(
                f"unknown or no lossless {kind} names {unknown}; known: {', '.join(known)}"
            )
    bins = max_bins if max_bins is not None else (QUICK_BINS if quick else FULL_BINS)
    if bins < 2:
        raise ConfigError(f"max_bins must be >= 2, got {bins}")
    if not 0.0 < effect_tv < 1.0 or not 0.0 < family_alpha < 1.0 or not 0.0 < power < 1.0:
        raise ConfigError("effect_tv, family_alpha and power must lie in (0, 1)")
    n_tests = len(mode_names) * len(proc_names)
    if samples is None:
        alpha = bonferroni(family_alpha, n_tests)
        samples = -(-required_samples(bins - 1, alpha, effect_tv, power) // 100) * 100
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    return {
        "modes": {n: DEFAULT_MODES[n] for n in mode_names},
        "processors": {n: DEFAULT_PROCESSORS[n] for n in proc_names},
        "samples": int(samples),
        "max_bins": bins,
        "family_alpha": family_alpha,
        "effect_tv": effect_tv,
    }


def check_lossless(
    make_target: Callable[[], Any],
    make_draft: Callable[[], Any],
    *,
    prompt: Sequence[int] = (1, 2, 3),
    greedy_tokens: int = 24,
    m: int = 2,
    samples: int = 4000,
    seed: int = 0,
    family_alpha: float = 1e-4,
    effect_tv: float = 0.05,
    max_bins: int = 16,
    modes: dict[str, tuple[str, SSDConfig | None]] | None = None,
    processors: dict[str, SamplingParams] | None = None,
    exact_ids: Sequence[int] | None = None,
    subject: str = "target/draft",
    timeout: float | None = DEFAULT_TIMEOUT,
) -> Report:
    """Check that speculative decoding over these models reproduces the target.

    The report's settings line states the power each statistical test has (at least)
    against a binned TV of ``effect_tv``; below 0.9 the run is labelled a smoke test,
    which catches only gross errors. :func:`lossless_plan` picks tests and samples for
    a stated power.

    Args:
        make_target: factory returning a fresh target model.
        make_draft: factory returning a fresh draft model (same vocabulary).
        prompt: the prompt (token ids valid for both models).
        greedy_tokens: tokens generated in the greedy-identity check.
        m: leading tokens compared in each statistical test.
        samples: sample size per statistical test.
        seed: base seed (the checks are reproducible).
        family_alpha: family-wise false-alarm bound over all statistical rows.
        effect_tv: the binned-TV effect the reported power refers to.
        max_bins: bins per G-test.
        modes: name -> (mode, config); default :data:`DEFAULT_MODES`.
        processors: name -> SamplingParams; default :data:`DEFAULT_PROCESSORS`.
        exact_ids: if given (2-4 distinct token ids), also enumerate the machine exactly
            on the models restricted to these ids.
        subject: the report's subject.
        timeout: seconds each row may run (``None``: no limit); a row that takes longer
            fails as timed out, is abandoned in its thread, and the rest are not run.

    Returns:
        A :class:`Report` with one row per check (``lossless.greedy_identity``,
        ``lossless.exact.<mode>.<processor>``, ``lossless.stat.<mode>.<processor>``).
    """
    modes = modes if modes is not None else DEFAULT_MODES
    processors = processors if processors is not None else DEFAULT_PROCESSORS
    start = time.perf_counter()
    jobs: list[tuple[str, Callable[[], CheckResult]]] = []

    # 1. Greedy identity.
    def greedy_identity() -> CheckResult:
        t0 = time.perf_counter()
        try:
            target, draft = make_target(), make_draft()
            greedy = SamplingParams(temperature=0.0)
            outs = {}
            # AR is the baseline even when the statistical family leaves it out.
            for name, (mode, config) in {"ar": ("ar", None), **modes}.items():
                res = generate(
                    target,
                    draft if mode != "ar" else None,
                    prompts=[list(prompt)],
                    mode=mode,
                    max_new_tokens=greedy_tokens,
                    sampling=greedy,
                    config=config,
                    seed=seed,
                )
                outs[name] = res.tokens[0]
            ref = next(iter(outs.values()))
            bad = [n for n, o in outs.items() if o != ref]
            first_diff = ""
            if bad:
                o = outs[bad[0]]
                i = next(
                    (j for j in range(min(len(o), len(ref))) if o[j] != ref[j]),
                    min(len(o), len(ref)),
                )
                first_diff = (
                    f"{bad[0]} differs from {next(iter(outs))} at generated token {i}: "
                    f"{o[i : i + 4]} vs {ref[i : i + 4]}"
                )
            return _row(
                "lossless.greedy_identity",
                not bad,
                f"{len(outs)} modes x {greedy_tokens} tokens",
                first_diff,
                t0,
            )
        except Exception as exc:
            return _error_row("lossless.greedy_identity", exc, t0)

    jobs.append(("lossless.greedy_identity", greedy_identity))

    # 2. Exact enumeration on a restricted vocabulary.
    if exact_ids is not None:
        ids = list(exact_ids)
        small_t = restrict_vocab(logits_fn_of(make_target), ids)
        small_d = restrict_vocab(logits_fn_of(make_draft), ids)
        for ename, emode, econfig in (
            ("sd", "sd", SSDConfig(k=2)),
            ("ssd", "ssd", SSDConfig(k=1, fanout=(1, 1), fallback="neural", saguaro_c=0.5)),
        ):
            for pname, params in processors.items():
                rname = f"lossless.exact.{ename}.{pname}"

                def exact_row(
                    rname: str = rname,
                    mode: str = emode,
                    config: SSDConfig = econfig,
                    params: SamplingParams = params,
                ) -> CheckResult:
                    t0 = time.perf_counter()
                    try:
                        c = compare_exact(
                            small_t,
                            small_d,
                            vocab_size=len(ids),
                            prompts=[[0, 1 % len(ids)]],
                            params=params,
                            mode=mode,
                            config=config,
                            max_new_tokens=2,
                        )
                        return _row(
                            rname,
                            c.max_abs_diff <= 1e-9,
                            f"max|diff| {c.max_abs_diff:.1e}",
                            f"exact enumeration differs from the target by "
                            f"{c.max_abs_diff:.3g} (TV {c.tv:.3g})",
                            t0,
                        )
                    except Exception as exc:
                        return _error_row(rname, exc, t0)

                jobs.append((rname, exact_row))

    # 3. The statistical family.
    n_tests = len(modes) * len(processors)
    alpha = bonferroni(family_alpha, n_tests)
    fn = logits_fn_of(make_target)
    for i, (mname, (mode, config)) in enumerate(modes.items()):
        for j, (pname, params) in enumerate(processors.items()):
            name = f"lossless.stat.{mname}.{pname}"

            def stat_row(
                name: str = name,
                mode: str = mode,
                config: SSDConfig | None = config,
                params: SamplingParams = params,
                test_seed: int = seed + 1000 * i + j,
            ) -> CheckResult:
                t0 = time.perf_counter()
                try:
                    r = statistical_lossless_test(
                        make_target,
                        make_draft,
                        fn,
                        prompt=prompt,
                        params=params,
                        mode=mode,
                        config=config,
                        m=m,
                        samples=samples,
                        seed=test_seed,
                        alpha=alpha,
                        effect_tv=effect_tv,
                        max_bins=max_bins,
                    )
                    return _row(
                        name,
                        not r.rejected,
                        f"p={r.p_value:.1e} pow={r.power:.2f}",
                        f"output distribution differs from the target: {r.summary()}",
                        t0,
                    )
                except Exception as exc:
                    return _error_row(name, exc, t0)

            jobs.append((name, stat_row))

    rows: list[CheckResult] = []
    hung: str | None = None
    for name, job in jobs:
        if hung is not None:
            rows.append(
                CheckResult(
                    name=name,
                    status=Status.SKIPPED,
                    message=f"not run: {hung} timed out, and the engine may still be busy in it",
                )
            )
            continue
        try:
            rows.append(call_with_timeout(job, timeout, name=name))
        except CheckTimeout as exc:
            hung = name
            rows.append(
                CheckResult(
                    name=name,
                    status=Status.FAILED,
                    measured=f"timeout {exc.seconds:g} s",
                    message=f"timed out after {exc.seconds:g} s (timeout={exc.seconds:g}) and "
                    f"was abandoned (its thread may keep running while a backend call is "
                    f"stuck); the remaining rows were not run",
                    seconds=exc.seconds,
                )
            )

    power = planned_power(
        samples, n_tests, family_alpha=family_alpha, effect_tv=effect_tv, max_bins=max_bins
    )
    label = (
        f"power >= {power:.2f} per test at binned TV {effect_tv:g}"
        if power >= SMOKE_POWER
        else f"SMOKE TEST: power only {power:.2f} per test at binned TV {effect_tv:g} "
        f"(catches gross errors only; raise samples for a real test)"
    )
    return Report(
        subject=subject,
        rows=tuple(rows),
        settings=(
            f"{n_tests} tests x {samples} samples, m={m}, bins<={max_bins}, "
            f"family_alpha={family_alpha} (alpha={alpha:.1e} per test), seed={seed}; {label}"
        ),
        seconds=time.perf_counter() - start,
    )
