"""``ssd simulate``: presets, sweeps, the JSON report and the plots (quick settings)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ssd_core import ConfigError, SSDConfig
from ssd_core.app.cli import main
from ssd_core.app.simulate import (
    PRESETS,
    SWEEPS,
    alpha_from_mean_accepted,
    resolve_fanout,
)

FIGURES = {
    "modes": "speedup_vs_k.png",
    "fanout": "fanout_vs_hit_rate.png",
    "budget": "budget.png",
    "c": "c_sweep.png",
    "fallback": "fallback_vs_batch.png",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    assert main(["simulate", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "simulate.json").read_text())


def test_quick_run_writes_every_sweep_to_the_json(quick_run):
    _, report = quick_run
    assert report["preset"]["name"] == "paper-llama70b"
    assert report["preset"]["target"]["per_call"] == pytest.approx(0.018)
    assert report["preset"]["draft"]["per_call"] == pytest.approx(0.0018)
    sweeps = {p["setting"]["sweep"] for p in report["points"]}
    assert sweeps == set(SWEEPS)
    for p in report["points"]:
        r = p["result"]
        assert p["prompts"] % p["setting"]["batch"] == 0 and p["prompts"] >= report["prompts"]
        assert r["tokens"] == p["prompts"] * report["max_new_tokens"]
        assert 0.0 <= r["hit_rate"] <= 1.0 and r["tokens_per_s"] > 0
        assert p["ssd_over_sd"] > 0 and p["ssd_over_ar"] > 0
    # Every point has its AR and SD baseline in the report.
    for key, base in report["baselines"].items():
        assert key.split("/")[0] in ("ar", "sd") and base["tokens_per_s"] > 0
    assert report["defaults"]["fanout_by_k"] == {"3": SSDConfig(k=3).fanout}


def test_quick_run_writes_the_plots(quick_run):
    out, report = quick_run
    for name in FIGURES.values():
        path = out / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(report["figures"]) == sorted(str(out / n) for n in FIGURES.values())


def test_the_swept_knobs_reach_the_config(quick_run):
    _, report = quick_run
    by_label = {(p["setting"]["sweep"], p["setting"]["label"], p["setting"]["temperature"]): p
                for p in report["points"]}  # fmt: skip
    assert by_label[("fanout", "uniform 3/pos", 0.0)]["config"]["fanout"] == [3, 3, 3, 3]
    assert by_label[("fanout", "adaptive B=12", 0.0)]["config"]["fanout"] == 12
    assert by_label[("c", "C=0.7", 1.0)]["config"]["saguaro_c"] == 0.7
    fb = [p for p in report["points"] if p["setting"]["sweep"] == "fallback"]
    assert {(p["config"]["fallback"], p["setting"]["batch"]) for p in fb} == {
        ("neural", 1), ("fast", 1), ("neural", 2), ("fast", 2)
    }  # fmt: skip


def test_simulated_runs_are_reproducible(tmp_path):
    args = ["simulate", "--quick", "--sweeps", "fanout", "--temperatures", "1"]
    reports = []
    for name in ("a", "b"):
        assert main([*args, "--out", str(tmp_path / name)]) == 0
        reports.append(json.loads((tmp_path / name / "simulate.json").read_text()))
    assert reports[0]["points"] == reports[1]["points"]


def test_more_fan_out_means_more_hits_at_t0(quick_run):
    _, report = quick_run
    hits = {
        p["setting"]["label"]: p["result"]["hit_rate"]
        for p in report["points"]
        if p["setting"]["sweep"] == "fanout" and p["setting"]["temperature"] == 0.0
    }
    assert hits["uniform 1/pos"] <= hits["uniform 3/pos"]


def test_list_presets(capsys):
    assert main(["simulate", "--list-presets"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert name in out
    assert "bandwidth" in out  # the paper preset states its derivation


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "nope"], "unknown preset"),
        (["--sweeps", "modes,nope"], "unknown sweep"),
        (["--budgets", "3y"], "fan-out"),
        (["--fallbacks", "slow"], "unknown fallback"),
        (["--ks", "0"], "K values"),
        (["--cs", "1.5"], "saguaro_c"),
    ],
)
def test_bad_arguments_fail_before_any_work(argv, message, capsys, tmp_path):
    assert main(["simulate", "--quick", "--out", str(tmp_path / "x"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@given(st.floats(0.01, 0.99), st.integers(1, 10))
def test_alpha_inverts_the_mean_accepted_length(a, k):
    mean = a * (1 - a**k) / (1 - a)
    assert alpha_from_mean_accepted(mean, k) == pytest.approx(a, abs=1e-6)


def test_alpha_edges():
    assert alpha_from_mean_accepted(0.0, 4) == 0.0
    assert alpha_from_mean_accepted(4.0, 4) == 1.0


def test_fanout_forms():
    assert resolve_fanout("3x", 6) == 21
    assert resolve_fanout("u2", 3) == (2, 2, 2, 2)
    assert resolve_fanout("12", 6) == 12
    assert resolve_fanout(None, 6) is None
    assert resolve_fanout((1, 2), 1) == (1, 2)
    with pytest.raises(ConfigError):
        resolve_fanout("three", 6)


def test_every_point_runs_whole_batches(tmp_path):
    argv = ["simulate", "--quick", "--sweeps", "fallback", "--batches", "1,2", "--prompts", "3",
            "--fallbacks", "fast", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "simulate.json").read_text())
    used = {p["setting"]["batch"]: p["prompts"] for p in report["points"]}
    assert used == {1: 3, 2: 4}
