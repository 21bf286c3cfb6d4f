"""The optional oracle check: the model's rows against a reference scorer's."""

from __future__ import annotations

import numpy as np
import pytest

import conformance
from backends.reference import ReferenceModel
from ssd_core import ConfigError

from .broken import NEEDS_REFERENCE, BakedTemperature, Wrapper, reference, reference_scorer


@pytest.mark.parametrize("name", sorted(NEEDS_REFERENCE))
def test_fault_the_same_on_every_handle_needs_a_reference(name: str) -> None:
    factory, text = NEEDS_REFERENCE[name]
    blind = conformance.check_model(factory, quick=False)
    assert blind.passed, blind.format_table()  # the model agrees with itself everywhere
    seen = conformance.check_model(factory, reference=reference_scorer)
    assert [r.name for r in seen.failures] == ["reference_logits"], seen.format_table()
    assert text in seen.failures[0].message


def test_baked_temperature_report_names_the_worst_row_and_context() -> None:
    row = conformance.check_model(
        BakedTemperature, reference=reference_scorer, only=["reference_logits"]
    ).rows[0]
    assert "30 of 30 rows differ from the reference scorer" in row.message
    assert "the worst, max |diff|" in row.message and "-token context [" in row.message
    assert "times 1.429" in row.message


def test_a_correct_model_passes_against_its_reference() -> None:
    report = conformance.check_model(Wrapper, reference=reference_scorer, quick=False)
    report.raise_for_failures()
    row = next(r for r in report.rows if r.name == "reference_logits")
    assert row.measured == "192 rows, max|diff| 0"  # 8 sequences x 24 tokens in --full
    assert "reference tolerance 0," in report.settings  # float64: exact


def test_a_constant_added_to_a_row_is_not_a_fault() -> None:
    class Shifted(Wrapper):
        def extend(self, requests):  # type: ignore[no-untyped-def]
            return self.inner.extend(requests) + 3.0

    report = conformance.check_model(Shifted, reference=reference_scorer, only=["reference_logits"])
    assert report.passed, report.format_table()


def test_tokens_off_by_one_are_recognised() -> None:
    class Rolled(Wrapper):
        def extend(self, requests):  # type: ignore[no-untyped-def]
            return np.roll(self.inner.extend(requests), 1, axis=1)

    row = conformance.check_model(
        Rolled, reference=reference_scorer, only=["reference_logits"]
    ).rows[0]
    assert row.failed and "token ids shifted by +1" in row.message


def test_stored_logits_are_a_reference() -> None:
    rng = np.random.default_rng(5)
    contexts = [tuple(int(t) for t in rng.integers(0, 32, size=n)) for n in (1, 2, 5, 9)]
    stored = {ctx: reference_scorer(ctx) for ctx in contexts}
    good = conformance.check_model(Wrapper, reference=stored, only=["reference_logits"])
    assert good.passed and good.rows[0].measured == "4 rows, max|diff| 0"
    bad = conformance.check_model(BakedTemperature, reference=stored, only=["reference_logits"])
    assert bad.failed and "temperature of 0.7" in bad.rows[0].message


def test_stored_contexts_past_context_size_are_left_out() -> None:
    stored = {(1, 2): reference_scorer((1, 2)), tuple(range(20)): reference_scorer(range(20))}

    def make():  # type: ignore[no-untyped-def]
        return Wrapper(reference(context_size=8))

    row = conformance.check_model(make, reference=stored, only=["reference_logits"]).rows[0]
    assert row.status is conformance.Status.PASSED
    assert "1 stored contexts past context_size left out" in row.measured


def test_reference_of_the_wrong_width_is_reported() -> None:
    row = conformance.check_model(
        Wrapper, reference=lambda ctx: np.zeros(33), only=["reference_logits"]
    ).rows[0]
    assert row.failed and "expected (32,)" in row.message


def test_reference_that_raises_is_reported() -> None:
    def scorer(ctx: tuple[int, ...]) -> np.ndarray:
        raise KeyError(ctx)

    row = conformance.check_model(Wrapper, reference=scorer, only=["reference_logits"]).rows[0]
    assert row.failed and "the reference scorer raised KeyError" in row.message


def test_torch_reference_rows_are_accepted() -> None:
    torch = pytest.importorskip("torch")
    report = conformance.check_model(
        Wrapper,
        reference=lambda ctx: torch.from_numpy(reference_scorer(ctx))[None, :],
        only=["reference_logits"],
    )
    assert report.passed, report.format_table()


@pytest.mark.parametrize("bad", [42, {}, {(): np.zeros(32)}, {"ab": np.zeros(32)}])
def test_a_bad_reference_is_a_config_error_before_any_work(bad: object) -> None:
    built: list[object] = []

    def make():  # type: ignore[no-untyped-def]
        built.append(1)
        return Wrapper()

    with pytest.raises(ConfigError, match="reference"):
        conformance.check_model(make, reference=bad)  # type: ignore[arg-type]
    assert not built


def test_reference_tolerance_decides() -> None:
    class Nudged(Wrapper):
        def extend(self, requests):  # type: ignore[no-untyped-def]
            out = self.inner.extend(requests)
            out[:, 0] += 1e-3
            return out

    strict = conformance.check_model(Nudged, reference=reference_scorer, only=["reference_logits"])
    assert strict.failed
    loose = conformance.check_model(
        Nudged, reference=reference_scorer, only=["reference_logits"], reference_tolerance=1e-2
    )
    assert loose.passed and "reference tolerance 0.01" in loose.settings


def test_whole_context_reference_model_against_its_own_function() -> None:
    truth = ReferenceModel.random(vocab_size=20, order=None, seed=4)
    report = conformance.check_model(
        lambda: ReferenceModel.random(vocab_size=20, order=None, seed=4),
        reference=truth.logits,
        only=["reference_logits"],
    )
    assert report.passed, report.format_table()
