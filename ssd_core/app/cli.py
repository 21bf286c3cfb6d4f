"""The ``ssd`` command: ``ssd generate``, ``ssd chat``, ``ssd bench``, ``ssd serve``,
``ssd simulate``, ``ssd export-onnx``, ``ssd backends``.

Backends are found by name through :func:`ssd_core.app.load_backend`; a model spec is
``NAME:ARGS`` for any installed backend (``reference:vocab=64,order=2,seed=1``,
``ngram:max_n=3``) or, without a known prefix, ARGS for ``--backend`` (a GGUF path, a
model directory).

A command is one ``add_<name>_parser(sub)`` function that builds its subparser (with
:func:`~ssd_core.app.common.new_command` and the shared flag groups of
:mod:`ssd_core.app.common`) and sets ``func``, the function :func:`main` calls with the
parsed arguments; registering a command is one line in :func:`build_parser`.

Exit codes: 0 done; 1 the run failed (a backend error); 2 a usage or input error (one
line, no traceback); 130 interrupted (Ctrl-C); 141 stdout closed (``| head``), quietly;
143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from ssd_core import Engine, GenerationError, SSDError

from .common import (
    HelpFormatter,
    add_decode_args,
    add_mode_arg,
    add_model_args,
    add_output_args,
    add_prompt_args,
    budget,
    check_decode_args,
    check_model_args,
    defaults_epilog,
    free_models,
    load_models,
    new_command,
)
from .console import (
    Renderer,
    Reply,
    Terminated,
    check_stops,
    describe,
    encode_prompt,
    note,
    read_prompt,
    run_reply,
    write_stdout,
)
from .registry import available_backends, load_backend
from .serve import add_serve_args, run_serve
from .simulate import add_parser as add_simulate_parser

__all__ = ["EXIT", "build_parser", "main"]

#: The exit codes (documented in docs/cli.md).
EXIT = {"ok": 0, "failed": 1, "usage": 2, "interrupted": 130, "pipe": 141, "terminated": 143}

EXIT_CODES_HELP = (
    "exit codes: 0 done, 1 the run failed, 2 usage or input error, 130 interrupted "
    "(Ctrl-C), 141 output pipe closed, 143 terminated"
)


def build_parser() -> argparse.ArgumentParser:
    """The ``ssd`` argument parser, one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="ssd",
        description="Speculative speculative decoding (Saguaro): exact, faster generation "
        "with a draft model. `ssd COMMAND --help` shows each command's flags and defaults.",
        epilog=EXIT_CODES_HELP,
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log what the engine does, and let engines (llama.cpp) print their own logs",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate_parser(sub)
    from .chat import add_chat_parser

    add_chat_parser(sub)
    add_bench_parser(sub)
    add_serve_parser(sub)
    add_simulate_parser(sub)
    add_export_onnx_parser(sub)
    add_backends_parser(sub)
    return parser


# -- ssd generate --------------------------------------------------------------------


def add_generate_parser(sub: Any) -> argparse.ArgumentParser:
    p = new_command(
        sub,
        "generate",
        help="generate text (or token ids) from one prompt",
        description="Generate from one prompt, streaming the text to stdout and a stats "
        "line to stderr. The prompt is the argument, -p TEXT, -f FILE, or stdin ('-', or "
        "a pipe when none is given).",
        epilog=defaults_epilog() + "\n\n" + EXIT_CODES_HELP,
    )
    add_prompt_args(p)
    add_mode_arg(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (text, tokens, finish_reason, usage, metrics) instead "
        "of streaming; no progress lines",
    )
    add_output_args(p)
    add_model_args(p)
    add_decode_args(p)
    p.set_defaults(func=run_generate)
    return p


def context_notice(reply: Reply, target: Any, n: int) -> str | None:
    """A line saying that generation stopped at the context, not at ``-n``."""
    r = reply.result
    if r is None or r.finish_reason != "length" or len(r.tokens) >= n:
        return None
    context = getattr(target, "context_size", None)
    return (
        f"stopped at the target's context size ({context} tokens; the prompt has "
        f"{r.prompt_tokens}, {len(r.tokens)} were generated): raise it with -c/--ctx-size"
    )


def run_generate(args: argparse.Namespace) -> int:
    """``ssd generate``: returns the exit code."""
    sampling, config = check_decode_args(args)
    check_model_args(args, need_draft=args.mode != "ar")
    text = read_prompt(args)
    target, draft = load_models(args, need_draft=args.mode != "ar", slots=1, quiet=args.json)
    try:
        check_stops(target, sampling)
        prompt = encode_prompt(target, text, chat=args.chat, system=args.system)
        n = budget(args, target, len(prompt))
        renderer = Renderer(target.tokenizer, special=args.special, stops=sampling.stop)
        write = None if args.json else write_stdout
        with Engine(target, draft, mode=args.mode, config=config, driver=args.driver) as engine:
            reply = run_reply(
                engine, prompt, sampling=sampling, max_new_tokens=n, seed=args.seed,
                renderer=renderer, write=write,
            )  # fmt: skip
            metrics = engine.metrics()
        if args.json:
            r = reply.result
            completion = len(reply.tokens)
            obj = {
                "text": reply.text,
                "tokens": reply.tokens,
                "finish_reason": r.finish_reason if r is not None else None,
                "stop": r.stop if r is not None else None,
                "usage": {
                    "prompt_tokens": len(prompt),
                    "completion_tokens": completion,
                    "total_tokens": len(prompt) + completion,
                },
                "mode": args.mode,
                "target": getattr(target, "name", None),
                "draft": getattr(draft, "name", None),
                "metrics": metrics.as_dict(),
            }
            if reply.error is not None:
                obj["error"] = describe(reply.error)
            write_stdout(json.dumps(obj) + "\n")
        else:
            write_stdout("\n")
            note(
                metrics.summary()
                + (f", finish: {reply.result.finish_reason}" if reply.result else "")
            )
            notice = context_notice(reply, target, n)
            if notice:
                note(notice)
        if reply.error is not None:
            note(describe(reply.error))
            return EXIT["failed"]
        if reply.terminated:
            note("terminated")
            return EXIT["terminated"]
        if reply.interrupted:
            note("interrupted")
            return EXIT["interrupted"]
        return EXIT["ok"]
    finally:
        free_models(target, draft)


# -- ssd bench -----------------------------------------------------------------------


#: ``ssd bench --preset NAME``: flags inserted before the user's, so the user's win.
BENCH_PRESETS: dict[str, tuple[str, ...]] = {
    # The paper's regime in miniature on a CPU: a memory-bound fp32 torch target (the
    # bundled SmolLM2, dequantised from its GGUF) and its own Q4_1 GGUF as a cheap
    # llama.cpp draft, one thread each (docs/benchmarks.md).
    "cpu-demo": (
        "--backend", "torch", "--device", "cpu", "--draft", "llama_cpp:",
        "-t", "1", "-td", "1", "--draft-max", "6",
    ),
}  # fmt: skip


def _with_preset(argv: Sequence[str]) -> list[str]:
    """``argv`` with a bench preset's flags put right after ``bench`` (unknown preset
    names are left for argparse to refuse)."""
    out = list(argv)
    if "bench" not in out:
        return out
    at = out.index("bench")
    rest = out[at + 1 :]
    for i, word in enumerate(rest):
        name = None
        if word == "--preset" and i + 1 < len(rest):
            name = rest[i + 1]
        elif word.startswith("--preset="):
            name = word.split("=", 1)[1]
        if name in BENCH_PRESETS:
            return out[: at + 1] + list(BENCH_PRESETS[name]) + rest
    return out


def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    from .bench import LEGEND, positive_limit

    p = new_command(
        sub,
        "bench",
        help="AR, SD and SSD on the same prompts: a table, bench.json and bench.png",
        description="Run each mode on the same prompts (the bundled set by default) and "
        "write a table, bench.json and bench.png.",
        epilog="table columns:\n" + LEGEND + "\n\n" + defaults_epilog(),
    )
    p.add_argument(
        "--preset",
        choices=sorted(BENCH_PRESETS),
        help="a named set of flags, put before yours (yours win): "
        + "; ".join(f"{name} = {' '.join(flags)}" for name, flags in BENCH_PRESETS.items())
        + " (default: none)",
    )
    p.add_argument("--modes", default="ar,sd,ssd", help="comma list of modes")
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="JSON file: a list of strings or token-id lists, or "
        '{"prompts": [{"text": ..., "chat": bool}, ...]} (default: the bundled set)',
    )
    p.add_argument(
        "--limit",
        type=positive_limit,
        metavar="N",
        help="use only the first N prompts (default: all)",
    )
    p.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png")
    p.add_argument(
        "--chat",
        action="store_true",
        help="apply the chat template to every prompt (default: where the prompt set says so)",
    )
    add_model_args(p)
    add_decode_args(p)

    def run(args: argparse.Namespace) -> int:
        from .bench import run_bench

        return run_bench(args)

    p.set_defaults(func=run)
    return p


# -- ssd serve -----------------------------------------------------------------------


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    p = new_command(sub, "serve", help="an OpenAI-compatible HTTP server (docs/serving.md)")
    add_serve_args(p)
    p.set_defaults(func=run_serve)
    return p


# -- ssd export-onnx -----------------------------------------------------------------


def add_export_onnx_parser(sub: Any) -> argparse.ArgumentParser:
    from .export import DTYPES

    p = new_command(
        sub,
        "export-onnx",
        help="export a Hugging Face folder, a GGUF file or smollm2 to ONNX, with its tokenizer",
        description="Export a Llama-family model (Llama 1-3, Qwen2, SmolLM2, ...) to an ONNX\n"
        "graph with a KV cache and save its tokenizer beside it, so that\n"
        '`ssd generate --backend onnxruntime -m OUT "text"` takes text. Needs torch,\n'
        "transformers and onnx (gguf for GGUF sources). See docs/onnxruntime.md.",
        epilog="examples:\n"
        "  ssd export-onnx smollm2 smollm2-onnx              # the bundled SmolLM2-135M\n"
        "  ssd export-onnx /models/llama-3.2-1b llama.onnx --dtype float16\n"
        "  ssd export-onnx model.Q4_K_M.gguf out --check 64  # compare with transformers",
    )
    p.add_argument(
        "src", metavar="SRC", help="a transformers model folder, a .gguf file, or smollm2"
    )
    p.add_argument(
        "out",
        metavar="OUT",
        help="a .onnx path, or a folder (OUT/model.onnx); the tokenizer files go beside it",
    )
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="the graph's dtype")
    p.add_argument(
        "--check",
        type=int,
        default=0,
        metavar="N",
        help="compare the graph's logits with transformers' over N positions; 0 skips it",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing .onnx file")
    p.add_argument("-t", "--threads", type=int, metavar="N", help="torch and onnxruntime threads")
    p.add_argument(
        "--json", action="store_true", help="print the report as one JSON object; no progress"
    )

    def run(args: argparse.Namespace) -> int:
        from .export import run_export

        return run_export(args)

    p.set_defaults(func=run)
    return p


# -- ssd backends --------------------------------------------------------------------


def add_backends_parser(sub: Any) -> argparse.ArgumentParser:
    p = new_command(sub, "backends", help="list installed backends")
    p.set_defaults(func=run_backends)
    return p


def run_backends(args: argparse.Namespace) -> int:
    for name, target in sorted(available_backends().items()):
        try:
            desc = load_backend(name).description
        except Exception as exc:  # an engine missing is normal: show why
            desc = f"(unavailable: {describe(exc)})"
        write_stdout(f"{name:12s} {target:36s} {desc}\n")
    return EXIT["ok"]


# -- output and signals ------------------------------------------------------------------


def _silence_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's final flush
    does not complain."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread while a command runs."""

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ssd`` console script; returns the exit code."""
    args = build_parser().parse_args(_with_preset(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        with _sigterm_as_exception():
            return int(args.func(args))
    except Terminated:
        note("terminated")
        return EXIT["terminated"]
    except KeyboardInterrupt:
        note("interrupted")
        return EXIT["interrupted"]
    except BrokenPipeError:
        _silence_stdout()
        return EXIT["pipe"]
    except GenerationError as exc:
        note(describe(exc))
        return EXIT["failed"]
    except SSDError as exc:
        note(f"error: {describe(exc)}")
        return EXIT["usage"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
