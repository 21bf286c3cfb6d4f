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

from ssd_core import SamplingParams, SSDConfig, generate

from ._report import CheckResult, Report, Status
from .exact import compare_exact, logits_fn_of, restrict_vocab
from .stats import bonferroni, statistical_lossless_test

__all__ = ["DEFAULT_MODES", "DEFAULT_PROCESSORS", "check_lossless"]

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
) -> Report:
    """Check that speculative decoding over these models reproduces the target.

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

    Returns:
        A :class:`Report` with one row per check (``lossless.greedy_identity``,
        ``lossless.exact.<mode>.<processor>``, ``lossless.stat.<mode>.<processor>``).
    """
    modes = modes if modes is not None else DEFAULT_MODES
    processors = processors if processors is not None else DEFAULT_PROCESSORS
    start = time.perf_counter()
    rows: list[CheckResult] = []

    # 1. Greedy identity.
    t0 = time.perf_counter()
    try:
        target, draft = make_target(), make_draft()
        greedy = SamplingParams(temperature=0.0)
        outs = {}
        for name, (mode, config) in modes.items():
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
                (j for j in range(min(len(o), len(ref))) if o[j] != ref[j]), min(len(o), len(ref))
            )
            first_diff = f"{bad[0]} differs from {next(iter(outs))} at generated token {i}: {o[i : i + 4]} vs {ref[i : i + 4]}"
        rows.append(
            _row(
                "lossless.greedy_identity",
                not bad,
                f"{len(modes)} modes x {greedy_tokens} tokens",
                first_diff,
                t0,
            )
        )
    except Exception as exc:
        rows.append(_error_row("lossless.greedy_identity", exc, t0))

    # 2. Exact enumeration on a restricted vocabulary.
    if exact_ids is not None:
        ids = list(exact_ids)
        small_t = restrict_vocab(logits_fn_of(make_target), ids)
        small_d = restrict_vocab(logits_fn_of(make_draft), ids)
        for name, mode, config in (
            ("sd", "sd", SSDConfig(k=2)),
            ("ssd", "ssd", SSDConfig(k=1, fanout=(1, 1), fallback="neural", saguaro_c=0.5)),
        ):
            for pname, params in processors.items():
                rname = f"lossless.exact.{name}.{pname}"
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
                    ok = c.max_abs_diff <= 1e-9
                    rows.append(
                        _row(
                            rname,
                            ok,
                            f"max|diff| {c.max_abs_diff:.1e}",
                            f"exact enumeration differs from the target by {c.max_abs_diff:.3g} (TV {c.tv:.3g})",
                            t0,
                        )
                    )
                except Exception as exc:
                    rows.append(_error_row(rname, exc, t0))

    # 3. The statistical family.
    alpha = bonferroni(family_alpha, len(modes) * len(processors))
    fn = logits_fn_of(make_target)
    for i, (mname, (mode, config)) in enumerate(modes.items()):
        for j, (pname, params) in enumerate(processors.items()):
            name = f"lossless.stat.{mname}.{pname}"
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
                    seed=seed + 1000 * i + j,
                    alpha=alpha,
                    effect_tv=effect_tv,
                    max_bins=max_bins,
                )
                rows.append(
                    _row(
                        name,
                        not r.rejected,
                        f"p={r.p_value:.1e} pow={r.power:.2f}",
                        f"output distribution differs from the target: {r.summary()}",
                        t0,
                    )
                )
            except Exception as exc:
                rows.append(_error_row(name, exc, t0))

    return Report(
        subject=subject,
        rows=tuple(rows),
        settings=(
            f"m={m} samples={samples} family_alpha={family_alpha} alpha={alpha:.1e} "
            f"effect_tv={effect_tv} seed={seed}"
        ),
        seconds=time.perf_counter() - start,
    )
