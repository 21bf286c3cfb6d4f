"""The ``ssd`` command on the reference backend (more in ``tests/cli/``)."""

from __future__ import annotations

import json

import pytest

from ssd_core.app.cli import main


def test_generate_json(capsys):
    rc = main(
        [
            "generate",
            "--backend",
            "reference",
            "--target",
            "reference:vocab=32,order=2,seed=3",
            "--max-new-tokens",
            "12",
            "--json",
            "--driver",
            "sequential",
            "--temperature",
            "1.0",
            "--k",
            "3",
            "--fanout",
            "2,1,1,2",
            "--fallback",
            "fast",
            "1 2 3",
        ]
    )
    assert rc == 0
    obj = json.loads(capsys.readouterr().out)
    assert len(obj["tokens"]) == 12 and obj["text"] is None
    for key in (
        "acceptance_per_token",
        "accepted_per_proposed",
        "cache_hit_rate",
        "tokens_per_second",
    ):
        assert key in obj["metrics"]
    assert all(0 <= t < 32 for t in obj["tokens"])


def test_generate_streams_ids_and_prints_stats(capsys):
    assert (
        main(["generate", "--backend", "reference", "--mode", "sd", "--max-new-tokens", "8", "5"])
        == 0
    )
    out = capsys.readouterr()
    assert len(out.out.split()) == 8
    assert "tokens in" in out.err


def test_greedy_modes_agree_through_the_cli(capsys):
    outs = []
    for mode in ("ar", "sd", "ssd"):
        main(
            [
                "generate",
                "--backend",
                "reference",
                "--mode",
                mode,
                "--json",
                "--max-new-tokens",
                "20",
                "7 8",
            ]
        )
        outs.append(json.loads(capsys.readouterr().out)["tokens"])
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["generate", "--backend", "nope"], "unknown backend"),
        (["generate", "--backend", "reference", "--k", "0"], "k must be"),
        (
            ["generate", "--backend", "reference", "--target", "reference:vocab=8", "99"],
            "outside the vocabulary",
        ),
        (["generate", "--backend", "reference", "hello"], "token ids"),
        (
            ["generate", "--backend", "reference", "--target", "reference:colour=3", "1"],
            "unknown reference spec key",
        ),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, text, capsys):
    assert main(argv) == 2
    assert text in capsys.readouterr().err


def test_backends_lists_reference(capsys):
    assert main(["backends"]) == 0
    assert "reference" in capsys.readouterr().out


def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = main(
        [
            "bench",
            "--backend",
            "reference",
            "--max-new-tokens",
            "8",
            "--limit",
            "2",
            "--driver",
            "sequential",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "greedy outputs identical across modes: True" in out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["modes"]) == {"ar", "sd", "ssd"} and report["prompts"] == 2
    assert (tmp_path / "bench.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        ("vocab=x", "reference spec vocab='x'"),
        ("vocab", "is not key=value"),
        ("sleep=maybe", "yes/no"),
    ],
)
def test_reference_spec_errors(spec, text):
    from backends.reference import parse_spec
    from ssd_core import ConfigError

    with pytest.raises(ConfigError, match=text):
        parse_spec(spec)
