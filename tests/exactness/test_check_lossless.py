"""check_lossless on the reference backend: passes on a correct pair, and fails (with
a readable row) when a lossy variant is installed."""

from __future__ import annotations

from backends.reference import ReferenceModel
from conformance.lossless import check_lossless
from ssd_core import SamplingParams

from ._lossy import install


def make_target() -> ReferenceModel:
    return ReferenceModel.random(vocab_size=40, order=2, seed=9, peakedness=2.0)


def make_draft() -> ReferenceModel:
    return ReferenceModel.perturbed(make_target(), divergence=0.7)


QUICK = {"T1": SamplingParams(temperature=1.0), "topp": SamplingParams(temperature=1.0, top_p=0.8)}


def test_reference_pair_passes() -> None:
    report = check_lossless(
        make_target, make_draft, samples=1500, processors=QUICK, exact_ids=[3, 7, 11]
    )
    assert report.passed, report.format_table()
    names = [r.name for r in report.rows]
    assert "lossless.greedy_identity" in names and "lossless.exact.ssd.topp" in names


def test_lossy_variant_fails() -> None:
    with install("top_p_first_position_only"):
        report = check_lossless(
            make_target,
            make_draft,
            samples=3000,
            processors={"topp": SamplingParams(temperature=1.0, top_p=0.5)},
            modes={"sd": ("sd", None)},
            exact_ids=[3, 7, 11],
        )
    assert report.failed
    assert any(r.name.startswith("lossless.exact") and r.failed for r in report.rows), (
        report.format_table()
    )
