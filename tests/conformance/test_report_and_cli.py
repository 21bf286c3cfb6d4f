"""The report value, the pytest helper and the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import conformance
from conformance import CheckResult, ConformanceError, Report, Status
from conformance._cli import main
from ssd_core import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _report(*statuses: Status) -> Report:
    rows = tuple(
        CheckResult(name=f"c{i}", status=s, measured="m", message=f"why {i}")
        for i, s in enumerate(statuses)
    )
    return Report(subject="thing", rows=rows)


def test_report_status() -> None:
    assert _report(Status.PASSED, Status.SKIPPED).passed
    assert _report(Status.PASSED, Status.FAILED).failed
    only_skips = _report(Status.SKIPPED)
    assert not only_skips.passed and not only_skips.failed
    assert only_skips.status is Status.SKIPPED


def test_raise_for_failures_lists_failed_checks_and_table() -> None:
    _report(Status.PASSED).raise_for_failures()
    with pytest.raises(ConformanceError) as info:
        _report(Status.PASSED, Status.FAILED).raise_for_failures()
    text = str(info.value)
    assert text.startswith("thing failed 1 conformance check(s): c1")
    assert "FAILED c1: why 1" in text and "c0" in text
    assert isinstance(info.value, AssertionError)
    assert info.value.report.failures[0].name == "c1"


def test_format_table_has_a_row_per_check() -> None:
    table = _report(Status.PASSED, Status.FAILED, Status.SKIPPED).format_table()
    assert "SKIPPED c2: why 2" in table
    assert "FAILED: 1 passed, 1 failed, 1 skipped" in table


def test_combine_keeps_rows_in_order() -> None:
    both = _report(Status.PASSED).combine(_report(Status.FAILED))
    assert [r.status for r in both.rows] == [Status.PASSED, Status.FAILED]


def test_assert_conforms_refuses_an_all_skipped_report() -> None:
    with pytest.raises(ConformanceError):
        conformance.assert_conforms(lambda: None, only=[])  # type: ignore[arg-type, return-value]


def test_unknown_check_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        conformance.check_model(lambda: None, only=["nope"])  # type: ignore[arg-type, return-value]


def test_cli_backend_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--backend", "reference", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "backend reference (reference:vocab=64,order=2,seed=1)" in out
    assert "PASSED" in out


def test_cli_factory_failure_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tests.conformance.broken:TruncateOffByOne", "--only", "truncate_reextend"]) == 1
    assert "kept one token too many" in capsys.readouterr().out


def test_cli_backend_args_and_full(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "--backend",
            "reference",
            "--args",
            "vocab=12,order=3,context=9",
            "--full",
            "--only",
            "context_capacity,stateful_walk",
        ]
    )
    assert rc == 0
    assert "context 9" in capsys.readouterr().out


def test_cli_unknown_backend_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--backend", "no_such_backend"]) == 2
    assert "unknown backend 'no_such_backend'" in capsys.readouterr().err


def test_backend_whose_engine_is_missing_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    import ssd_core.app.registry as registry

    monkeypatch.setitem(registry.IN_HOUSE, "ghost", "tests.conformance.ghost_engine:BACKEND")
    report = conformance.check_backend("ghost")
    assert report.status is Status.SKIPPED
    assert "engine not installed" in report.rows[0].message
    assert "SKIPPED" in report.format_table()


def test_python_dash_m_entry_point() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "conformance",
            "tests.conformance.broken:Noisy",
            "--only",
            "determinism",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "determinism" in proc.stdout and "FAILED" in proc.stdout


def test_conformance_does_not_import_pytest() -> None:
    code = (
        "import sys, conformance, conformance.__main__; "
        "bad = [m for m in ('pytest', 'torch', 'backends') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_backend_whose_load_fails_reports_one_failed_row(monkeypatch: pytest.MonkeyPatch) -> None:
    import ssd_core.app.registry as registry

    monkeypatch.setitem(registry.IN_HOUSE, "ghost", "tests.conformance.ghost_engine:BROKEN_LOAD")
    report = conformance.check_backend("ghost")
    assert report.failed
    assert [r.name for r in report.rows] == ["load"]
    assert "FileNotFoundError" in report.rows[0].message


def test_cli_list_names_every_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in conformance.CHECK_NAMES)


def test_cli_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    target = tmp_path / "report.json"
    rc = main(["tests.conformance.broken:CloseIsNoop", "--only", "close", "--json", str(target)])
    assert rc == 1
    data = json.loads(target.read_text())
    assert data[0]["status"] == "failed"
    assert data[0]["rows"][0]["name"] == "close"
    assert "HandleError" in data[0]["rows"][0]["message"]
    assert "FAILED close" in capsys.readouterr().out


def test_draft_only_backend_is_checked_on_its_default_draft(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ssd_core.app.registry as registry

    monkeypatch.setitem(registry.IN_HOUSE, "ghost", "tests.conformance.ghost_engine:DRAFT_ONLY")
    report = conformance.check_backend("ghost")
    assert report.passed
    assert "vocab 64" in report.rows[0].measured


def test_large_context_capacity_is_skipped_in_quick_and_run_in_full() -> None:
    from backends.reference import ReferenceModel

    def make():  # type: ignore[no-untyped-def]
        return ReferenceModel.random(vocab_size=8, order=1, context_size=300)

    quick = conformance.check_model(make, only=["context_capacity"])
    assert quick.rows[0].status is Status.SKIPPED
    assert "run --full" in quick.rows[0].message
    assert conformance.check_model(make, only=["context_capacity"], quick=False).passed


def test_cli_args_need_exactly_one_backend() -> None:
    with pytest.raises(SystemExit) as info:
        main(["--backend", "reference", "--backend", "other", "--args", "vocab=8"])
    assert info.value.code == 2


def test_cli_runs_the_lossless_half_with_its_own_settings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc = main(
        [
            "tests.conformance.broken:lossless_target",
            "--draft",
            "tests.conformance.broken:lossless_draft",
            "--only",
            "attributes",
            "--samples",
            "600",
            "--modes",
            "sd,ssd-fast",
            "--processors",
            "topp0.8",
            "--bins",
            "4",
            "--exact-ids",
            "3,7",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "lossless.greedy_identity" in out and "lossless.stat.ssd-fast.topp0.8" in out
    assert "lossless.exact.ssd.topp0.8" in out and "lossless.stat.ssd-fast.T1" not in out
    assert "2 tests x 600 samples, m=2, bins<=4" in out
    assert "SMOKE TEST: power only 0.0" in out  # 600 samples cannot see TV 0.05


def test_quick_lossless_plan_has_real_power_at_the_old_budget() -> None:
    """--quick used 8 tests x 1,500 samples with power 0.03 at TV 0.05; the plan spends
    the same samples on fewer, coarser tests, each with power >= 0.9."""
    from conformance import lossless_plan, planned_power

    for quick in (True, False):
        plan = lossless_plan(quick=quick)
        n_tests = len(plan["modes"]) * len(plan["processors"])
        power = planned_power(
            plan["samples"],
            n_tests,
            family_alpha=plan["family_alpha"],
            effect_tv=plan["effect_tv"],
            max_bins=plan["max_bins"],
        )
        assert power >= 0.9, (quick, plan["samples"], power)
        if quick:
            assert n_tests * plan["samples"] <= 8 * 1500
    old = planned_power(1500, 8, family_alpha=1e-4, effect_tv=0.05, max_bins=16)
    assert old < 0.05


def test_lossless_plan_rejects_unknown_names() -> None:
    from conformance import lossless_plan

    with pytest.raises(ConfigError, match="unknown or no lossless processor"):
        lossless_plan(processors=["T7"])
    with pytest.raises(ConfigError, match="mode"):
        lossless_plan(modes=[])


def test_cli_lossless_flags_need_a_draft(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["tests.conformance.broken:lossless_target", "--samples", "100"])
    assert info.value.code == 2
    assert "give --draft FACTORY too" in capsys.readouterr().err


def test_cli_bad_exact_ids_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "tests.conformance.broken:lossless_target",
            "--draft",
            "tests.conformance.broken:lossless_draft",
            "--exact-ids",
            "3",
        ]
    )
    assert rc == 2
    assert "2-4 distinct token ids" in capsys.readouterr().err


def test_cli_reference_catches_a_baked_temperature(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["tests.conformance.broken:BakedTemperature"]
    assert main(args) == 0  # the model agrees with itself everywhere
    capsys.readouterr()
    rc = main([*args, "--reference", "tests.conformance.broken:reference_scorer"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAILED reference_logits" in out and "temperature of 0.7" in out


def test_cli_reference_must_be_callable_or_mapping(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["tests.conformance.broken:Wrapper", "--reference", "conformance:DEFAULT_TIMEOUT"])
    assert rc == 2
    assert "neither callable nor a mapping" in capsys.readouterr().err


def test_cli_timeout_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tests.conformance.broken:Wrapper", "--only", "attributes", "--timeout", "0"]) == 0
    assert "timeout none per check" in capsys.readouterr().out
    assert main(["tests.conformance.broken:Wrapper", "--only", "attributes", "--timeout", "7"]) == 0
    assert "timeout 7 s per check" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["tests.conformance.broken:Wrapper", "--timeout", "-1"])
