"""The flags: llama.cpp-style short names next to the long ones, ``-v`` anywhere, help
text and defaults on every flag, and one set of defaults shared with the Python API."""

from __future__ import annotations

import argparse
import json

import pytest

from ssd_core import SamplingParams, SSDConfig, generate
from ssd_core.app.cli import build_parser, main
from ssd_core.app.common import API_DEFAULTS, CLI_DEFAULTS

from .helpers import REF

COMMANDS = ("generate", "chat", "bench")


def _sub(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize(
    ("short", "long_", "dest", "value", "parsed"),
    [
        ("-m", "--target", "target", "x.gguf", "x.gguf"),
        ("-m", "--model", "target", "x.gguf", "x.gguf"),
        ("-md", "--draft", "draft", "d.gguf", "d.gguf"),
        ("-md", "--model-draft", "draft", "d.gguf", "d.gguf"),
        ("-n", "--max-new-tokens", "max_new_tokens", "7", 7),
        ("-n", "--n-predict", "max_new_tokens", "7", 7),
        ("-c", "--ctx-size", "n_ctx", "256", 256),
        ("-c", "--n-ctx", "n_ctx", "256", 256),
        ("-t", "--threads", "threads", "3", 3),
        ("-s", "--seed", "seed", "9", 9),
        ("--temp", "--temperature", "temperature", "0.8", 0.8),
        ("--draft-max", "--k", "k", "6", 6),
        ("-fa", "--flash-attn", "flash_attn", "off", "off"),
        ("-ngl", "--n-gpu-layers", "n_gpu_layers", "99", 99),
    ],
)
@pytest.mark.parametrize("command", COMMANDS)
def test_short_and_long_flags_are_the_same_option(command, short, long_, dest, value, parsed):
    extra = ["1"] if command == "generate" else []
    a = parse(command, short, value, *extra)
    b = parse(command, long_, value, *extra)
    assert getattr(a, dest) == getattr(b, dest) == parsed


def test_prompt_flags():
    args = parse("generate", "-p", "hello", "-f", "x.txt")
    assert (args.prompt, args.prompt_opt, args.prompt_file) == (None, "hello", "x.txt")
    assert parse("generate", "--draft-min", "2").draft_min == 2


@pytest.mark.parametrize("command", ("generate", "chat", "bench", "backends"))
def test_verbose_before_or_after_the_command(command):
    assert parse("-v", command).verbose is True
    assert parse(command, "-v").verbose is True
    assert parse(command).verbose is False


def test_flash_attn_takes_on_off_auto_only(capsys):
    assert parse("generate", "-fa", "ON").flash_attn == "on"
    with pytest.raises(SystemExit) as exc:
        parse("generate", "-fa", "maybe")
    assert exc.value.code == 2
    assert "expected on, off or auto" in capsys.readouterr().err


def test_abbreviations_are_refused(capsys):
    # --temp is its own flag; an abbreviation like --tem must not silently pick one
    with pytest.raises(SystemExit):
        parse("generate", "--tem", "0.5")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help_and_shows_its_default(command):
    parser = _sub(command)
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        if not action.option_strings:
            continue
        shown = (
            "%(default)" in action.help
            or "default" in parser._get_formatter()._get_help_string(action)
        )
        explained = "default" in action.help or action.default in (False, argparse.SUPPRESS, [])
        assert shown or explained, f"{command} {action.option_strings}: no default shown"
    assert "(default: 0.0)" in text and "(default: 4)" in text
    assert "Defaults that differ from the Python API" in text


def test_help_has_no_traceback_and_exits_0(capsys):
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            parse(command, "--help")
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: ssd chat" in out and "table columns" in out


def test_api_defaults_are_read_from_the_api():
    sp, cfg = SamplingParams(), SSDConfig()
    assert API_DEFAULTS["temperature"] == sp.temperature == 1.0
    assert API_DEFAULTS["k"] == cfg.k and API_DEFAULTS["fanout"] is None
    assert cfg.fanout == 3 * (cfg.k + 1) and API_DEFAULTS["saguaro_c"] is cfg.saguaro_c is None
    assert API_DEFAULTS["fallback"] == cfg.fallback
    import inspect

    sig = inspect.signature(generate).parameters
    assert API_DEFAULTS["driver"] == sig["driver"].default
    assert API_DEFAULTS["max_new_tokens"] == sig["max_new_tokens"].default


@pytest.mark.parametrize("command", ("generate", "bench"))
def test_cli_defaults_equal_the_apis_except_the_documented_ones(command):
    args = parse(command, *(["1"] if command == "generate" else []))
    differ = {
        name
        for name, value in API_DEFAULTS.items()
        if hasattr(args, name) and getattr(args, name) != value
    }
    assert differ == set(CLI_DEFAULTS)
    for name, (value, why) in CLI_DEFAULTS.items():
        assert getattr(args, name) == value and len(why) > 40


def test_chat_differs_only_in_its_reply_budget():
    args = parse("chat")
    differ = {
        name
        for name, value in API_DEFAULTS.items()
        if hasattr(args, name) and getattr(args, name) != value
    }
    assert differ == set(CLI_DEFAULTS) | {"max_new_tokens"}
    assert "(default: 512)" in _sub("chat").format_help()


def test_draft_min_is_refused_with_a_clear_error(capsys):
    assert main(["generate", *REF, "--draft-min", "1", "1 2"]) == 2
    err = capsys.readouterr().err
    assert "--draft-min is not supported yet" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", (["-fa", "off"], ["-ngl", "1"], ["--n-seq", "2"], ["-ngld", "1"]))
def test_llama_only_flags_on_other_backends_are_refused(flag, capsys):
    assert main(["generate", *REF, *flag, "1 2"]) == 2
    assert "applies to llama_cpp models only" in capsys.readouterr().err


def test_max_new_tokens_minus_one_needs_a_context(capsys):
    assert main(["generate", *REF, "-n", "-1", "1 2"]) == 2
    assert "needs a model with a context size" in capsys.readouterr().err
    target = "reference:vocab=64,order=2,seed=1,context=12"
    argv = ["generate", "--backend", "reference", "-m", target, "-n", "-1", "--json", "1 2"]
    assert main(argv) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["finish_reason"] == "length" and obj["usage"]["completion_tokens"] == 11
    assert main(["generate", *REF, "-n", "-2", "1"]) == 2


def test_seed_is_checked_before_loading(capsys):
    assert main(["generate", *REF, "-s", "-1", "1"]) == 2
    assert "seed" in capsys.readouterr().err


def test_stop_escapes():
    from ssd_core.app.common import sampling_from

    args = parse("generate", "--stop", r"\n\n", "--stop", r"a\\nb", "--stop", r"\x", "1")
    assert sampling_from(args).stop == ("\n\n", "a\\nb", "\\x")
    assert sampling_from(args).ignore_eos is False
    assert sampling_from(parse("generate", "--ignore-eos", "1")).ignore_eos is True


def test_a_bench_preset_is_flags_before_yours():
    from ssd_core.app.cli import BENCH_PRESETS, _with_preset, build_parser

    args = build_parser().parse_args(_with_preset(["bench", "--preset", "cpu-demo"]))
    assert (args.backend, args.draft, args.device, args.k) == ("torch", "llama_cpp:", "cpu", 6)
    assert args.threads == args.draft_threads == 1
    mine = build_parser().parse_args(_with_preset(["-v", "bench", "--preset=cpu-demo", "--draft-max", "4"]))
    assert mine.k == 4 and mine.backend == "torch" and mine.verbose
    assert "cpu-demo" in BENCH_PRESETS
    with pytest.raises(SystemExit):
        build_parser().parse_args(_with_preset(["bench", "--preset", "nope"]))
