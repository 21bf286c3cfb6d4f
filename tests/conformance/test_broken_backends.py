"""Each deliberately broken backend is caught, with a message that names the fault."""

from __future__ import annotations

import pytest

import conformance

from .broken import BROKEN, BatchDependent, ForkAliasing, Noisy, TruncateOffByOne


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


# The walk sends only valid ids (clips_tokens), and its oracle scores each request with
# one multi-token extend, so a consistent row shift (rows_ahead) is extend_vs_prefill's job.
@pytest.mark.parametrize("name", sorted(set(BROKEN) - {"clips_tokens", "rows_ahead"}))
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
