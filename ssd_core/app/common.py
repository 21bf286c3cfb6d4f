"""What ``ssd generate``, ``ssd bench`` (and later commands) share: the model and
decoding flags, building models from them, and turning a prompt into token ids."""

from __future__ import annotations

import argparse
from typing import Any

from ssd_core import DRIVERS, FALLBACKS, Model, SamplingParams, SSDConfig, SSDError, free_model

from .registry import available_backends, load_backend

__all__ = [
    "add_decode_args",
    "add_model_args",
    "config_from",
    "encode_prompt",
    "free_models",
    "load_models",
    "sampling_from",
]

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


def add_model_args(p: argparse.ArgumentParser) -> None:
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


def add_decode_args(p: argparse.ArgumentParser) -> None:
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


def free_models(*models: Model | None) -> None:
    """Release every model given (``None`` entries skipped)."""
    for m in models:
        if m is not None:
            free_model(m)
