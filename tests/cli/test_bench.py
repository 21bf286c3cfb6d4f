"""``ssd bench``: a table with a legend, a self-describing PNG with only the panels that
apply, and its inputs and output folder checked before any model is loaded."""

from __future__ import annotations

import json
import os

import pytest

from ssd_core.app import cli
from ssd_core.app.bench import LEGEND, _title, panels_for

from .helpers import REF


def _bench(tmp_path, *extra):
    return cli.main(
        ["bench", *REF, "-n", "6", "--limit", "2", "--driver", "sequential",
         "--out", str(tmp_path / "out"), *extra]
    )  # fmt: skip


def test_table_legend_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert _bench(tmp_path) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:4] == ["mode", "tok/s", "range", "alpha"] and "bound" in header
    for column in ("alpha", "E[acc]", "tok/pass", "T_verify", "T_draft", "bound", "hit"):
        assert f"\n  {column}" in "\n" + LEGEND and column in out
    ar_row = next(line for line in out.splitlines() if line.startswith("ar "))
    assert ar_row.split()[3] == "-"  # no acceptance for target-only decoding
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["legend"] == LEGEND and report["backend"] == "reference"
    for mode in ("ar", "sd", "ssd"):
        row = report["modes"][mode]
        assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
        assert len(report["per_prompt"][mode]) == 2
    assert (tmp_path / "out" / "bench.png").stat().st_size > 10_000


def test_only_the_panels_that_apply():
    titles = lambda modes: [p[0] for p in panels_for(modes, "wall clock")]  # noqa: E731
    assert titles(["ar"]) == ["tokens / s (wall clock)"]
    assert titles(["ar", "sd"]) == [
        "tokens / s (wall clock)", "tokens per target pass", "per-token acceptance (alpha)",
    ]  # fmt: skip
    assert titles(["ar", "sd", "ssd"])[-1] == "SSD cache hit rate"
    alpha = panels_for(["ar", "sd", "ssd"], "wall clock")[2]
    assert alpha[1] == ["sd", "ssd"]  # no empty bar for ar


def test_title_names_model_backend_and_configuration():
    report = {
        "draft": "ngram", "target": "SmolLM2", "backend": "llama_cpp", "prompts": 3,
        "max_new_tokens": 64, "k": 4, "fanout": 12, "saguaro_c": 1.0, "fallback": "auto",
        "temperature": 0.0, "driver": "threaded", "clock": "wall clock", "when": "today",
        "machine": {"platform": "Linux"},
    }  # fmt: skip
    title = _title(report)
    for text in ("SmolLM2 (llama_cpp)", "draft ngram", "K=4", "fan-out 12", "C=1.0",
                 "fallback auto", "temperature 0.0", "threaded driver", "3 prompts"):  # fmt: skip
        assert text in title


@pytest.fixture
def no_models(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr("ssd_core.app.bench.load_models", refuse)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "is not valid JSON: Expecting property name"),
        (b'{"prompts": 3}', "must hold a list of strings"),
        (b"[]", "must hold a list"),
        (b'[["a", 1]]', "prompt 0 is not"),
        (b'["ok", ""]', "prompt 1 is not"),
        (b"\xff", "is not UTF-8"),
    ],
)
def test_bad_prompt_files_fail_before_loading(tmp_path, capsys, no_models, content, message):
    f = tmp_path / "p.json"
    f.write_bytes(content)
    assert _bench(tmp_path, "--prompts", str(f)) == 2
    assert message in capsys.readouterr().err


def test_an_unusable_out_folder_fails_before_loading(tmp_path, capsys, no_models):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["bench", *REF, "--out", str(blocker)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert cli.main(["bench", *REF, "--out", str(blocker / "sub")]) == 2
    assert "cannot create --out folder" in capsys.readouterr().err
    (tmp_path / "out" / "bench.json").mkdir(parents=True)
    assert cli.main(["bench", *REF, "--out", str(tmp_path / "out")]) == 2
    assert "cannot overwrite" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_out_folder_fails_before_loading(tmp_path, capsys, no_models):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert cli.main(["bench", *REF, "--out", str(ro)]) == 2
        assert "permission denied" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)
