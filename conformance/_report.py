"""Result rows, the report that collects them, and the error raised on failure."""

from __future__ import annotations

import enum
from typing import Any

import attrs

__all__ = ["CheckResult", "ConformanceError", "Report", "Status"]


class Status(str, enum.Enum):
    """The outcome of one check."""

    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


class ConformanceError(AssertionError):
    """A backend failed the conformance suite; the message holds the whole report table.

    Subclasses :class:`AssertionError` so that pytest shows it as a test failure.
    """

    def __init__(self, report: Report) -> None:
        super().__init__(report.failure_text())
        self.report = report


@attrs.frozen(kw_only=True)
class CheckResult:
    """One row of a report.

    Attributes:
        name: the check's name (``"fork_independence"``).
        status: passed, failed or skipped.
        measured: the figure the check measured, as text (``"max|diff| 0"``,
            ``"32 handles"``), or ``""``.
        message: for a failure, what went wrong and where to look; for a skip, why.
        seconds: wall time the check took.
    """

    name: str
    status: Status
    measured: str = ""
    message: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        """Whether this check failed."""
        return self.status is Status.FAILED


def _cell(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


@attrs.frozen(kw_only=True)
class Report:
    """The result of running a conformance suite on one model factory.

    Attributes:
        subject: what was checked (the model's name, a factory path, a backend name).
        rows: one :class:`CheckResult` per check, in the order they ran.
        settings: the settings that mattered, as text (tolerances, quick/full, seed).
        seconds: total wall time.
    """

    subject: str
    rows: tuple[CheckResult, ...]
    settings: str = ""
    seconds: float = 0.0

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        """The failed rows."""
        return tuple(r for r in self.rows if r.failed)

    @property
    def failed(self) -> bool:
        """Whether any check failed."""
        return bool(self.failures)

    @property
    def passed(self) -> bool:
        """Whether no check failed *and* at least one check passed.

        A report whose checks were all skipped (an engine that is not installed) is
        neither passed nor failed: see :attr:`status`.
        """
        return not self.failed and any(r.status is Status.PASSED for r in self.rows)

    @property
    def status(self) -> Status:
        """``FAILED`` if any check failed, ``PASSED`` if any passed, else ``SKIPPED``."""
        if self.failed:
            return Status.FAILED
        return Status.PASSED if self.passed else Status.SKIPPED

    def format_table(self) -> str:
        """The report as a fixed-width text table, one check per line, messages below.

        Returns:
            Multi-line text ending with a summary line.
        """
        lines = [f"conformance report for {self.subject}"]
        if self.settings:
            lines.append(f"  settings: {self.settings}")
        w_name = max([len("check"), *(len(r.name) for r in self.rows)])
        w_meas = min(max([len("measured"), *(len(r.measured) for r in self.rows)]), 28)
        lines.append(f"  {'check':<{w_name}}  {'result':<7}  {'measured':<{w_meas}}  {'time':>7}")
        lines.append(f"  {'-' * w_name}  {'-' * 7}  {'-' * w_meas}  {'-' * 7}")
        for r in self.rows:
            lines.append(
                f"  {r.name:<{w_name}}  {r.status.value:<7}  "
                f"{_cell(r.measured, w_meas):<{w_meas}}  {r.seconds:>6.2f}s"
            )
        notes = [r for r in self.rows if r.message and r.status is not Status.PASSED]
        if notes:
            lines.append("")
        for r in notes:
            lines.append(f"  {r.status.value.upper()} {r.name}: {r.message}")
        counts = {s: sum(r.status is s for r in self.rows) for s in Status}
        lines.append("")
        lines.append(
            f"  {self.status.value.upper()}: {counts[Status.PASSED]} passed, "
            f"{counts[Status.FAILED]} failed, {counts[Status.SKIPPED]} skipped "
            f"in {self.seconds:.2f}s"
        )
        return "\n".join(lines)

    def failure_text(self) -> str:
        """A short headline naming the failed checks, followed by the full table."""
        names = ", ".join(r.name for r in self.failures) or "none"
        return f"{self.subject} failed {len(self.failures)} conformance check(s): {names}\n\n" + (
            self.format_table()
        )

    def raise_for_failures(self) -> None:
        """Raise if any check failed; do nothing otherwise.

        Raises:
            ConformanceError: at least one check failed; its message lists them and
                holds the whole table.
        """
        if self.failed:
            raise ConformanceError(self)

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data (for CI dashboards and ``--json``).

        Returns:
            ``{"subject", "status", "settings", "seconds", "rows": [{"name", "status",
            "measured", "message", "seconds"}, ...]}``.
        """
        return {
            "subject": self.subject,
            "status": self.status.value,
            "settings": self.settings,
            "seconds": self.seconds,
            "rows": [
                {
                    "name": r.name,
                    "status": r.status.value,
                    "measured": r.measured,
                    "message": r.message,
                    "seconds": r.seconds,
                }
                for r in self.rows
            ],
        }

    def combine(self, other: Report) -> Report:
        """This report's rows followed by ``other``'s (e.g. model checks + lossless checks).

        Args:
            other: a report on the same subject.

        Returns:
            A new report; settings are joined, times added.
        """
        settings = "; ".join(s for s in (self.settings, other.settings) if s)
        return Report(
            subject=self.subject,
            rows=self.rows + other.rows,
            settings=settings,
            seconds=self.seconds + other.seconds,
        )
