"""Print every statistical test's figures (p-value, sample size, bins, stated power) at
the end of the run, so the power a run had is in its output even when it passes."""

from __future__ import annotations

from typing import Any

from ._runs import REPORT


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORT:
        return
    terminalreporter.section("exactness: statistical tests (G statistic, p, level, n, power)")
    for line in REPORT:
        terminalreporter.write_line(line)
