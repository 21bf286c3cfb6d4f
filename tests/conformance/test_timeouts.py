"""A hanging backend fails the check it hangs in; the suite goes on to a clean report."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

import conformance
from conformance import Status
from ssd_core import ConfigError

from .broken import HangsOnBatches, Wrapper, lossless_target, reference

CHECKS = ["attributes", "empty_open", "batched_vs_separate", "truncate_reextend"]


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """An event the hanging backend waits on; set at teardown, and the abandoned
    worker threads are waited for, so no test leaves a thread behind."""
    event = threading.Event()
    yield event
    event.set()
    deadline = time.monotonic() + 10
    for thread in threading.enumerate():
        if thread.name.startswith("conformance: "):
            thread.join(max(0.0, deadline - time.monotonic()))
            assert not thread.is_alive(), thread.name


def test_a_hung_check_fails_and_the_rest_are_not_run(release: threading.Event) -> None:
    report = conformance.check_model(lambda: HangsOnBatches(release), only=CHECKS, timeout=2)
    status = {r.name: r.status for r in report.rows}
    assert status == {
        "attributes": Status.PASSED,
        "empty_open": Status.PASSED,
        "batched_vs_separate": Status.FAILED,
        "truncate_reextend": Status.SKIPPED,
    }
    hung = report.rows[2]
    assert hung.message.startswith("timed out after 2 s (timeout=2) during batch of 2 requests")
    assert "may keep running" in hung.message and hung.measured == "timeout 2 s"
    assert "not run: batched_vs_separate timed out" in report.rows[3].message
    assert any(t.name == "conformance: batched_vs_separate" for t in threading.enumerate())


def test_a_factory_that_hangs_fails_the_survey(release: threading.Event) -> None:
    def make():  # type: ignore[no-untyped-def]
        release.wait()
        return Wrapper()

    report = conformance.check_model(make, only=["attributes", "close"], timeout=1)
    assert [(r.name, r.status) for r in report.rows] == [
        ("survey", Status.FAILED),
        ("attributes", Status.SKIPPED),
        ("close", Status.SKIPPED),
    ]
    assert "timed out after 1 s" in report.rows[0].message
    with pytest.raises(conformance.ConformanceError, match="survey"):
        report.raise_for_failures()


def test_a_hung_lossless_row_fails_and_the_rest_are_not_run(release: threading.Event) -> None:
    def draft():  # type: ignore[no-untyped-def]
        hang = HangsOnBatches(release)
        hang.inner = lossless_target()  # the target's vocabulary
        hang.vocab_size = hang.inner.vocab_size
        return hang

    report = conformance.check_lossless(
        lossless_target, draft, samples=50, processors=None, modes=None, timeout=2
    )
    assert report.rows[0].name == "lossless.greedy_identity"
    assert report.rows[0].failed and "timed out after 2 s" in report.rows[0].message
    assert all(r.status is Status.SKIPPED for r in report.rows[1:])
    assert len(report.rows) == 21


def test_no_timeout_runs_in_the_calling_thread() -> None:
    seen: list[str] = []

    class Where(Wrapper):
        def open(self, tokens):  # type: ignore[no-untyped-def]
            seen.append(threading.current_thread().name)
            return super().open(tokens)

    assert conformance.check_model(Where, only=["empty_open"], timeout=None).passed
    assert set(seen) == {threading.main_thread().name}
    seen.clear()
    assert conformance.check_model(Where, only=["empty_open"]).passed
    assert set(seen) == {"conformance: survey", "conformance: empty_open"}


@pytest.mark.parametrize("bad", [0, -1.0, True])
def test_timeout_must_be_positive(bad: object) -> None:
    with pytest.raises(ConfigError, match="timeout"):
        conformance.check_model(reference, timeout=bad)  # type: ignore[arg-type]
