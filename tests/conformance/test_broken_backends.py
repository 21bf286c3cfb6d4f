"""Each deliberately broken backend is caught, with a message that names the fault."""

from __future__ import annotations

import numpy as np
import pytest

import conformance

from .broken import (
    BROKEN,
    BatchDependent,
    ForkAliasing,
    Noisy,
    StaleAfterRefusal,
    SwapsPairs,
    TruncateOffByOne,
    reference,
)

#: Faults the random walk cannot reach: it sends only valid ids (clips_tokens), its
#: oracle scores each request with one multi-token extend, so a consistent row shift is
#: extend_vs_prefill's job (rows_ahead), and it never fills a handle to context_size.
NOT_FOR_THE_WALK = {"clips_tokens", "rows_ahead", "keeps_what_fits", "stale_after_refusal"}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_backend_is_caught(name: str) -> None:
    factory, must_fail, text = BROKEN[name]
    report = conformance.check_model(factory)
    failed = {r.name for r in report.failures}
    assert report.failed and not report.passed
    assert set(must_fail) <= failed, report.format_table()
    message = next(r.message for r in report.failures if r.name == must_fail[0])
    assert text in message, message
    with pytest.raises(conformance.ConformanceError) as info:
        conformance.assert_conforms(factory)
    assert must_fail[0] in str(info.value)


@pytest.mark.parametrize("name", sorted(set(BROKEN) - NOT_FOR_THE_WALK))
def test_random_walk_alone_catches_stateful_faults(name: str) -> None:
    factory, _, _ = BROKEN[name]
    settings = conformance.Settings(walk_runs=3)  # --quick walks once; give it three tries
    report = conformance.check_model(factory, only=["stateful_walk"], settings=settings)
    assert report.failed, report.format_table()
    assert "shrunk from" in report.rows[0].message


def test_truncate_message_names_the_off_by_one() -> None:
    row = conformance.check_model(TruncateOffByOne, only=["truncate_reextend"]).rows[0]
    assert "truncate(handle, 9)" in row.message
    assert "kept one token too many" in row.message


def test_fork_aliasing_message_names_shared_state() -> None:
    row = conformance.check_model(ForkAliasing, only=["fork_independence"]).rows[0]
    assert "the fork shares state with its parent" in row.message


def test_tolerance_decides_batch_dependence() -> None:
    """A batch effect of 1e-3 per extra request fails at the default and passes when allowed."""
    strict = conformance.check_model(BatchDependent, only=["batched_vs_separate"])
    assert strict.failed and "batch tolerance 0" in strict.settings
    loose = conformance.check_model(
        BatchDependent, only=["batched_vs_separate"], batch_tolerance=0.01
    )
    assert loose.passed


def test_noise_below_tolerance_passes_and_above_fails() -> None:
    assert conformance.check_model(
        lambda: Noisy(scale=1e-7), only=["determinism"], tolerance=1e-4
    ).passed
    assert conformance.check_model(
        lambda: Noisy(scale=1e-2), only=["determinism"], tolerance=1e-4
    ).failed


def test_walk_failure_reproduces_from_seed() -> None:
    a = conformance.check_model(TruncateOffByOne, only=["stateful_walk"], seed=3).rows[0]
    b = conformance.check_model(TruncateOffByOne, only=["stateful_walk"], seed=3).rows[0]
    assert a.message == b.message


def test_factory_that_raises_fails_every_check() -> None:
    def broken_factory():  # type: ignore[no-untyped-def]
        raise RuntimeError("weights not found")

    report = conformance.check_model(broken_factory)
    assert all(r.failed for r in report.rows)
    assert "make_model(): raised RuntimeError: weights not found" in report.rows[0].message


def test_swapped_pair_is_reported_as_rows_in_the_wrong_order() -> None:
    """Two requests' rows swapped is not batch dependence: the report names the requests."""
    row = conformance.check_model(SwapsPairs, only=["batched_vs_separate"]).rows[0]
    assert row.failed
    assert "batch of 2 requests (in order): rows in the wrong order" in row.message
    assert (
        "order request 1 (handle" in row.message and "instead of request 0 (handle" in row.message
    )
    assert "depend on what else is in the batch" not in row.message


def test_batch_dependence_is_not_mistaken_for_row_order() -> None:
    row = conformance.check_model(BatchDependent, only=["batched_vs_separate"]).rows[0]
    assert "depend on what else is in the batch" in row.message
    assert "wrong order" not in row.message


def test_walk_names_swapped_rows_too() -> None:
    settings = conformance.Settings(walk_runs=3)
    row = conformance.check_model(SwapsPairs, only=["stateful_walk"], settings=settings).rows[0]
    assert "rows in the wrong order" in row.message, row.message


def test_row_level_permutation_is_described_row_by_row() -> None:
    from conformance._probe import describe_permutation, find_permutation

    want = np.arange(12.0).reshape(4, 3)  # request 0: rows 0-1, request 1: rows 2-3
    got = want[[0, 2, 1, 3]]  # one row of each request traded places
    src = find_permutation(got, want, 0.0)
    assert src == [0, 2, 1, 3]
    text = describe_permutation(src, [2, 2], ["request 0", "request 1"])
    assert text == (
        "the rows returned for request 0 are request 0 row 0, request 1 row 0; "
        "the rows returned for request 1 are request 0 row 1, request 1 row 1"
    )
    assert find_permutation(got + 1e-3, want, 0.0) is None  # wrong values: no permutation


def test_capacity_fault_is_reported_as_the_rows_it_got_wrong() -> None:
    """The refused tokens leak into the next extend: the report shows the bad row, not a
    CapacityError from a comparison handle built past context_size."""
    row = conformance.check_model(StaleAfterRefusal, only=["context_capacity"]).rows[0]
    assert row.failed
    assert "after its refused 3-token extend: row 0" in row.message
    assert "CapacityError" not in row.message


def test_an_explanation_that_cannot_be_computed_never_hides_the_mismatch() -> None:
    from conformance._probe import Fault, Probe
    from ssd_core import CapacityError

    p = Probe(reference(), tolerance=0.0, batch_tolerance=0.0, rng=np.random.default_rng(0))

    def impossible() -> np.ndarray:
        raise CapacityError("past context_size")

    with pytest.raises(Fault) as info:
        p.compare(
            np.zeros((1, 4)), np.ones((1, 4)), "step", context_len=3, explain=[("x", impossible)]
        )
    assert "row 0 (logits after 4 tokens) differs" in str(info.value)
