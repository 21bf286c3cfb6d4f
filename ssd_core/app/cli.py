"""The ``ssd`` command: ``ssd generate``, ``ssd bench``, ``ssd simulate``, ``ssd backends``.

Backends are found by name through :func:`ssd_core.app.load_backend`; a model spec is
``NAME:ARGS`` for any installed backend (``reference:vocab=64,order=2,seed=1``,
``ngram:max_n=3``) or, without a known prefix, ARGS for ``--backend`` (a GGUF path, a
model directory).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from ssd_core import MODES, GenerationError, SSDError, stream

from .common import (
    add_decode_args,
    add_model_args,
    config_from,
    encode_prompt,
    free_models,
    load_models,
    sampling_from,
)
from .registry import available_backends, load_backend
from .simulate import add_parser as add_simulate_parser

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssd", description="Speculative speculative decoding (Saguaro)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text (or token ids) from a prompt")
    gen.add_argument(
        "prompt",
        nargs="?",
        default=None,
        help="prompt text; for id-only models, token ids separated by spaces or commas",
    )
    gen.add_argument("--mode", choices=MODES, default="ssd")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument(
        "--json", action="store_true", help="print one JSON object instead of streaming"
    )
    add_model_args(gen)
    add_decode_args(gen)

    bench = sub.add_parser("bench", help="AR, SD and SSD on the same prompts; table, JSON and plot")
    bench.add_argument("--modes", default="ar,sd,ssd", help="comma list of modes")
    bench.add_argument(
        "--prompts",
        help="JSON file: a list of strings or token-id lists, or "
        '{"prompts": [{"text": ..., "chat": bool}, ...]}',
    )
    bench.add_argument("--limit", type=int, help="use only the first N prompts")
    bench.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png")
    bench.add_argument(
        "--chat",
        action="store_true",
        help="apply the chat template to every prompt (default: where the prompt set says so)",
    )
    add_model_args(bench)
    add_decode_args(bench)

    sub.add_parser("backends", help="list installed backends")
    add_simulate_parser(sub)
    return parser


def _generate(args: argparse.Namespace) -> int:
    target, draft = load_models(args, need_draft=args.mode != "ar")
    try:
        prompt = encode_prompt(target, args.prompt, chat=args.chat)
        events = stream(
            target, draft, prompts=[prompt], mode=args.mode, max_new_tokens=args.max_new_tokens,
            sampling=sampling_from(args), config=config_from(args), driver=args.driver, seed=args.seed,
        )  # fmt: skip
        tok = getattr(target, "tokenizer", None)
        out: list[int] = []
        shown = ""
        try:
            for ev in events:
                out.extend(ev.tokens)
                if args.json:
                    continue
                if tok is None:
                    sys.stdout.write(" ".join(str(t) for t in ev.tokens) + " ")
                else:
                    text = tok.decode(out)
                    # Hold back a trailing replacement char: a multi-byte character may be incomplete.
                    stable = text.rstrip("\ufffd")
                    if stable.startswith(shown):
                        sys.stdout.write(stable[len(shown) :])
                        shown = stable
                sys.stdout.flush()
        finally:
            events.close()
        result_metrics = events.result().metrics if events.finished else None
        text = tok.decode(out) if tok is not None else None
        if args.json:
            obj = {
                "tokens": out,
                "text": text,
                "prompt_tokens": len(prompt),
                "metrics": result_metrics.as_dict() if result_metrics else None,
            }
            print(json.dumps(obj))
        else:
            if tok is not None and text is not None and text.startswith(shown):
                sys.stdout.write(text[len(shown) :])
            sys.stdout.write("\n")
            if result_metrics is not None:
                print(result_metrics.summary(), file=sys.stderr)
        return 0
    finally:
        free_models(target, draft)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ssd`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "backends":
            for name, target in sorted(available_backends().items()):
                try:
                    desc = load_backend(name).description
                except Exception as exc:  # an engine missing is normal: show why
                    desc = f"(unavailable: {exc})"
                print(f"{name:12s} {target:36s} {desc}")
            return 0
        if args.command == "generate":
            return _generate(args)
        if args.command == "bench":
            from .bench import run_bench

            return run_bench(args)
        if args.command == "simulate":
            from .simulate import run_simulate

            return run_simulate(args)
    except GenerationError as exc:
        print(f"ssd: {exc}", file=sys.stderr)
        return 1
    except SSDError as exc:
        print(f"ssd: error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
