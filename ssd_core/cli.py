"""The ``ssd`` command: ``ssd generate``, ``ssd bench``, ``ssd backends``.

Backends are found by name through :func:`ssd_core.load_backend`; a model spec is
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
from typing import Any

from ._api import GenerationError, stream
from ._config import FALLBACKS, MODES, SamplingParams, SSDConfig
from ._drivers import DRIVERS
from ._errors import SSDError
from ._protocol import Model
from ._registry import available_backends, load_backend

__all__ = ["build_parser", "load_models", "main"]

DEFAULT_BACKEND = "llama_cpp"


def _fanout(text: str) -> int | tuple[int, ...]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        if len(parts) == 1:
            return int(parts[0])
        return tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"fanout must be an int budget or a comma list, got {text!r}"
        ) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument(
        "--backend", default=DEFAULT_BACKEND, help="target backend (default: %(default)s)"
    )
    g.add_argument("--target", help="target model spec (default: the backend's bundled model)")
    g.add_argument("--draft", help="draft model spec (default: the backend's default draft)")
    g.add_argument("--threads", type=int, help="CPU threads per model (engine backends)")
    g.add_argument(
        "--draft-threads", type=int, help="CPU threads for the draft (default: --threads)"
    )
    g.add_argument("--n-ctx", type=int, help="context size (engine backends)")
    g.add_argument("--n-gpu-layers", type=int, help="layers to offload to the GPU (llama_cpp)")
    g.add_argument("--device", help="target device, e.g. cpu, cuda:0 (torch, onnx)")
    g.add_argument("--draft-device", help="draft device (default: --device)")
    g.add_argument("--dtype", help="float32, bfloat16 or float16 (torch)")


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--k", type=int, default=4, help="draft tokens per speculation")
    g.add_argument(
        "--fanout", type=_fanout, default=12, help="budget B, or F_0..F_K as a comma list"
    )
    g.add_argument(
        "--saguaro-c", type=float, default=1.0, help="Saguaro sampling constant C in (0, 1]"
    )
    g.add_argument("--fallback", choices=FALLBACKS, default="auto")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--draft-temperature", type=float, default=None)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--driver", choices=DRIVERS, default="threaded")


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
    _add_model_args(gen)
    _add_decode_args(gen)

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
    _add_model_args(bench)
    _add_decode_args(bench)

    sub.add_parser("backends", help="list installed backends")
    return parser


def _split_spec(spec: str, default_backend: str) -> tuple[str, str]:
    name, sep, rest = spec.partition(":")
    if sep and name in available_backends():
        return name, rest
    return default_backend, spec


def _options(args: argparse.Namespace, role: str) -> dict[str, Any]:
    draft = role == "draft"
    opts: dict[str, Any] = {
        "role": role,
        "threads": (args.draft_threads or args.threads) if draft else args.threads,
        "n_ctx": args.n_ctx,
        "n_gpu_layers": args.n_gpu_layers,
        "device": (args.draft_device or args.device) if draft else args.device,
        "dtype": args.dtype,
    }
    return {k: v for k, v in opts.items() if v is not None}


def load_models(args: argparse.Namespace, *, need_draft: bool) -> tuple[Model, Model | None]:
    """Build the target (and draft) the command line asks for.

    Raises:
        UnknownOptionError: an unknown backend name.
        SSDError: the backend could not build the model (missing engine or file).
    """
    backend = load_backend(args.backend)
    target_spec = args.target or backend.default_target
    if target_spec is None:
        raise SSDError(f"backend {args.backend!r} has no default model; pass --target")
    t_name, t_args = _split_spec(target_spec, args.backend)
    t_backend = backend if t_name == args.backend else load_backend(t_name)
    target = t_backend.load(t_args, _options(args, "target"))
    if not need_draft:
        return target, None
    draft_spec = args.draft or backend.default_draft
    if draft_spec is None:
        raise SSDError(f"backend {args.backend!r} has no default draft; pass --draft")
    d_name, d_args = _split_spec(draft_spec, args.backend)
    d_backend = t_backend if d_name == t_name else load_backend(d_name)
    opts = _options(args, "draft")
    opts.update(vocab_size=target.vocab_size, target=target, target_args=t_args)
    return target, d_backend.load(d_args, opts)


def sampling_from(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        draft_temperature=args.draft_temperature,
    )


def config_from(args: argparse.Namespace) -> SSDConfig:
    return SSDConfig(k=args.k, fanout=args.fanout, saguaro_c=args.saguaro_c, fallback=args.fallback)


def encode_prompt(target: Model, text: str | None, *, chat: bool) -> list[int]:
    """Token ids for ``text``: through the tokenizer, or parsed ids for id-only models."""
    tok = getattr(target, "tokenizer", None)
    if tok is None:
        raw = (text or "1 2 3").replace(",", " ").split()
        try:
            return [int(x) for x in raw]
        except ValueError:
            raise SSDError(
                f"model {getattr(target, 'name', '?')!r} has no tokenizer: give the prompt as token ids"
            ) from None
    text = text if text is not None else "The capital of France is"
    if chat:
        template = getattr(target, "apply_chat_template", None)
        if template is None:
            raise SSDError(f"model {getattr(target, 'name', '?')!r} has no chat template")
        return list(template([{"role": "user", "content": text}]))
    return list(tok.encode(text))


def _close_models(*models: Model | None) -> None:
    for m in models:
        close = getattr(m, "free", None)
        if callable(close):
            close()


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
        _close_models(target, draft)


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
            from .cli_bench import run_bench

            return run_bench(args)
    except GenerationError as exc:
        print(f"ssd: {exc}", file=sys.stderr)
        return 1
    except SSDError as exc:
        print(f"ssd: error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
