"""The Hypothesis flavour of the random walk: reference passes, broken backends fail."""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from hypothesis.stateful import run_state_machine_as_test  # noqa: E402

import conformance  # noqa: E402

from .broken import ForkAliasing, TruncateOffByOne, reference  # noqa: E402

FAST = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

TestReferenceStateful = conformance.model_state_machine(lambda: reference(context_size=12)).TestCase
TestReferenceStateful.settings = FAST


@pytest.mark.parametrize("broken", [ForkAliasing, TruncateOffByOne])
def test_hypothesis_walk_catches_broken_backends(broken: type) -> None:
    machine = conformance.model_state_machine(broken)
    fail_fast = settings(
        FAST, max_examples=200, phases=[Phase.generate], report_multiple_bugs=False
    )
    with pytest.raises(Exception) as info:
        run_state_machine_as_test(machine, settings=fail_fast)
    text = f"{type(info.value).__name__}: {info.value}"
    assert any(s in text for s in ("differs from", "HandleError", "InputError")), text
