"""The public conformance suite against the torch backend's tiny models."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import conformance  # noqa: E402


@pytest.mark.parametrize("batching", ["auto", "loop"])
def test_torch_conforms(kind, batching, th):
    report = conformance.check_model(lambda: th.make_model(kind, batching=batching))
    assert report.passed, report.format_table()
