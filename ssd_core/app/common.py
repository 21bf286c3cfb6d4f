"""What the ``ssd`` commands share: the model, decoding and prompt flags (one function
per group, so a new command registers its flags in a line or two), the defaults and
why the command line's differ from the Python API's, and building models from the
flags (with a progress line). Terminal input and output live in
:mod:`ssd_core.app.console`.
"""

from __future__ import annotations

import argparse
import inspect
import textwrap
from typing import Any

import attrs

from ssd_core import (
    DRIVERS,
    FALLBACKS,
    MODES,
    ConfigError,
    CostModel,
    Model,
    SamplingParams,
    SSDConfig,
    SSDError,
    free_model,
    generate,
)

from .console import Progress
from .registry import available_backends, load_backend

__all__ = [
    "API_DEFAULTS",
    "CLI_DEFAULTS",
    "DEFAULT_BACKEND",
    "HelpFormatter",
    "add_decode_args",
    "add_mode_arg",
    "add_model_args",
    "add_output_args",
    "add_prompt_args",
    "add_verbose_arg",
    "budget",
    "check_decode_args",
    "check_model_args",
    "config_from",
    "defaults_epilog",
    "free_models",
    "load_models",
    "new_command",
    "sampling_from",
    "unescape",
]

DEFAULT_BACKEND = "llama_cpp"

# -- defaults ------------------------------------------------------------------------

_SAMPLING = SamplingParams()
_CONFIG = SSDConfig()
_GENERATE = {
    name: p.default
    for name, p in inspect.signature(generate).parameters.items()
    if p.default is not inspect.Parameter.empty
}

#: The Python API's defaults (``SamplingParams()``, ``SSDConfig()``, ``generate()``),
#: read from the API itself so the two can never drift apart silently.
API_DEFAULTS: dict[str, Any] = {
    "mode": _GENERATE["mode"],
    "max_new_tokens": _GENERATE["max_new_tokens"],
    "seed": _GENERATE["seed"],
    "driver": _GENERATE["driver"],
    "temperature": _SAMPLING.temperature,
    "top_k": _SAMPLING.top_k,
    "top_p": _SAMPLING.top_p,
    "min_p": _SAMPLING.min_p,
    "draft_temperature": _SAMPLING.draft_temperature,
    "ignore_eos": _SAMPLING.ignore_eos,
    "k": _CONFIG.k,
    # None: chosen from K (the budget) and from the temperature (C) -- see SSDConfig.
    "fanout": attrs.fields(SSDConfig).fanout.default,
    "saguaro_c": attrs.fields(SSDConfig).saguaro_c.default,
    "fallback": _CONFIG.fallback,
    "adaptive": _CONFIG.adaptive,
    "cost": _CONFIG.cost,
}

#: Where the command line's defaults differ from the Python API's, and why (shown by
#: ``ssd generate --help`` and docs/cli.md; a test checks nothing else differs).
CLI_DEFAULTS: dict[str, tuple[Any, str]] = {
    "temperature": (
        0.0,
        "greedy, as transformers' generate() and llama-cpp-python at temperature 0: the "
        "same prompt gives the same text in every mode (ar, sd, ssd) and on every driver, "
        "which is what a command for trying and timing speculation needs; the Python "
        "API's SamplingParams() follows vLLM and the OpenAI API (1.0); llama.cpp's own "
        "CLI samples at 0.8 (--temp 0.8)",
    ),
    "driver": (
        "threaded",
        "draft and target on their own threads, so the draft's work overlaps the "
        "target's, which is where SSD's speed comes from (Engine() defaults to it too); "
        "generate() runs sequentially because a one-call library function should not "
        "start threads; the tokens are the same under every driver",
    ),
}


def _default(name: str) -> Any:
    return CLI_DEFAULTS[name][0] if name in CLI_DEFAULTS else API_DEFAULTS[name]


def defaults_epilog() -> str:
    """The paragraph ``--help`` ends with: the defaults that differ from the API's."""
    lines = [
        "Defaults that differ from the Python API (generate(), SamplingParams(), SSDConfig()):"
    ]
    for name, (value, why) in CLI_DEFAULTS.items():
        text = f"{name} = {value!r} (API: {API_DEFAULTS[name]!r}): {why}."
        lines.extend(textwrap.wrap(text, width=88, initial_indent="  ", subsequent_indent="    "))
    return "\n".join(lines)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help, except ``None`` and ``False``
    defaults, whose meaning the help text itself says."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" in text
            or not action.option_strings
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or action.default == []
        ):
            return text
        return text + " (default: %(default)s)"


def new_command(
    sub: Any, name: str, *, help: str, description: str | None = None, epilog: str | None = None
) -> argparse.ArgumentParser:
    """Add subcommand ``name`` with the house formatter, no abbreviated options and
    ``-v`` (also accepted after the subcommand)."""
    p: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=description or help,
        epilog=epilog,
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    add_verbose_arg(p)
    return p


# -- flags ---------------------------------------------------------------------------


def add_verbose_arg(p: argparse.ArgumentParser) -> None:
    """``-v/--verbose`` on ``p``; on a subcommand it defaults to what the top level
    said, so ``ssd -v generate`` and ``ssd generate -v`` are the same."""
    if "-v" in p._option_string_actions:
        return
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log what the engine does, and let engines (llama.cpp) print their own logs",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


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


def _flash(text: str) -> str:
    value = text.strip().lower()
    if value not in ("on", "off", "auto"):
        raise argparse.ArgumentTypeError(f"expected on, off or auto, got {text!r}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags that say which models to load and how (``-m``, ``-md``, ``-t``, ``-c``,
    ``-ngl``, ``-fa``, ...), and ``-v``."""
    add_verbose_arg(p)
    g = p.add_argument_group("models")
    g.add_argument(
        "--backend",
        default=DEFAULT_BACKEND,
        help="backend of the models whose spec has no NAME: prefix (see `ssd backends`)",
    )
    g.add_argument(
        "-m",
        "--model",
        "--target",
        dest="target",
        metavar="SPEC",
        help="target model: a GGUF path, a model folder, or NAME:ARGS "
        "(default: the backend's bundled model)",
    )
    g.add_argument(
        "-md",
        "--model-draft",
        "--draft",
        dest="draft",
        metavar="SPEC",
        help="draft model, as for -m (default: the backend's default draft; "
        "llama_cpp: an n-gram draft)",
    )
    g.add_argument(
        "-t",
        "--threads",
        type=_positive_int,
        metavar="N",
        help="CPU threads per model (default: the backend's; llama_cpp: half the cores, at most 4)",
    )
    g.add_argument(
        "-td",
        "--threads-draft",
        "--draft-threads",
        dest="draft_threads",
        type=_positive_int,
        metavar="N",
        help="CPU threads for the draft (default: -t)",
    )
    g.add_argument(
        "-c",
        "--ctx-size",
        "--n-ctx",
        dest="n_ctx",
        type=_positive_int,
        metavar="N",
        help="context size: the most tokens (prompt + generated) one sequence may hold "
        "(default: the backend's; llama_cpp: 1024)",
    )
    g.add_argument(
        "--n-seq",
        type=_positive_int,
        metavar="N",
        help="llama_cpp: sequence slots of the target; each holds -c cells of KV cache "
        "(default: 1 for generate, chat and bench, which run one request at a time)",
    )
    g.add_argument(
        "-ngl",
        "--n-gpu-layers",
        "--gpu-layers",
        dest="n_gpu_layers",
        type=int,
        metavar="N",
        help="llama_cpp: layers to offload to the GPU (default: 0; needs a GPU build)",
    )
    g.add_argument(
        "-ngld",
        "--n-gpu-layers-draft",
        dest="n_gpu_layers_draft",
        type=int,
        metavar="N",
        help="llama_cpp: layers of the draft to offload (default: -ngl)",
    )
    g.add_argument(
        "-fa",
        "--flash-attn",
        dest="flash_attn",
        type=_flash,
        metavar="on|off|auto",
        help="llama_cpp: flash attention (default: the backend's, auto). llama-cpp-python "
        "defaults to off; use -fa off to reproduce its greedy tokens (docs/cli.md)",
    )
    g.add_argument(
        "--device", help="target device, e.g. cpu, cuda:0 (torch, onnxruntime; default: cpu)"
    )
    g.add_argument("--draft-device", help="draft device (default: --device)")
    g.add_argument("--dtype", help="torch: float32, bfloat16 or float16 (default: float32)")


def add_mode_arg(p: argparse.ArgumentParser) -> None:
    """``--mode ar|sd|ssd``."""
    p.add_argument(
        "--mode",
        choices=MODES,
        default=_default("mode"),
        help="ar: target only; sd: the draft proposes, the target verifies; "
        "ssd: Saguaro, the draft pre-speculates while the target verifies",
    )


def add_decode_args(p: argparse.ArgumentParser) -> None:
    """Sampling, speculation and stopping flags (``-n``, ``-s``, ``--temp``,
    ``--draft-max``, ``--stop``, ...)."""
    g = p.add_argument_group("decoding")
    g.add_argument(
        "-n",
        "--max-new-tokens",
        "--n-predict",
        dest="max_new_tokens",
        type=int,
        metavar="N",
        default=_default("max_new_tokens"),
        help="tokens to generate at most; -1: until a stop or the context is full",
    )
    g.add_argument(
        "-s", "--seed", type=int, default=_default("seed"), help="seed of the random draws"
    )
    g.add_argument(
        "--temp",
        "--temperature",
        dest="temperature",
        type=float,
        default=_default("temperature"),
        help="target temperature; 0 is greedy (the API's default is 1.0; see below)",
    )
    g.add_argument(
        "--top-k", type=int, default=_default("top_k"), help="keep the K most likely; 0 = off"
    )
    g.add_argument("--top-p", type=float, default=_default("top_p"), help="nucleus mass; 1 = off")
    g.add_argument(
        "--min-p",
        type=float,
        default=_default("min_p"),
        help="drop tokens below this fraction of the top one; 0 = off",
    )
    g.add_argument(
        "--draft-temperature",
        "--temp-draft",
        dest="draft_temperature",
        type=float,
        help="the draft's temperature (default: --temp); any value is lossless",
    )
    g.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help=r"stop when the text contains TEXT (repeatable; \n, \t, \\ are escapes); "
        "the output ends before it",
    )
    g.add_argument(
        "--ignore-eos", action="store_true", help="do not stop at the model's end-of-text tokens"
    )
    s = p.add_argument_group("speculation")
    s.add_argument(
        "--draft-max",
        "--k",
        dest="k",
        type=int,
        metavar="K",
        default=_default("k"),
        help="draft tokens per speculation (K)",
    )
    s.add_argument(
        "--draft-min",
        type=int,
        metavar="N",
        help="llama.cpp's minimum speculation length: not supported yet, giving it is an "
        "error (default: unset); the engine has no such setting (docs/cli.md)",
    )
    s.add_argument(
        "--fanout",
        type=_fanout,
        default=_default("fanout"),
        help="SSD: cached outcomes per round, a budget B or F_0..F_K as a comma list "
        "(default: the budget 3 (K + 1))",
    )
    s.add_argument(
        "--saguaro-c",
        type=float,
        default=_default("saguaro_c"),
        help="SSD: Saguaro sampling constant C in (0, 1]; 1 = plain sampling (default: "
        "from the draft temperature -- 1 when greedy or at T >= 1, 0.85 up to T = 0.7)",
    )
    s.add_argument(
        "--fallback",
        choices=FALLBACKS,
        default=_default("fallback"),
        help="SSD, on a cache miss: draft just in time (neural), n-gram backup tokens "
        "(fast) or choose per round (auto)",
    )
    s.add_argument(
        "--adaptive",
        action=argparse.BooleanOptionalAction,
        default=_default("adaptive"),
        help="choose each round's speculation length (0 included: a plain target step) "
        "and SSD tree size from the costs (Saguaro's Theorem 7); --no-adaptive proposes "
        "--draft-max tokens every round",
    )
    s.add_argument(
        "--cost",
        type=_cost,
        default=_default("cost"),
        metavar="SOURCE",
        help="what a round costs, for --adaptive: 'declared' (the models' own figures; "
        "reproducible), 'measured' (fitted from this run's timings; at temperature > 0 "
        "two runs may then differ) or VERIFY_CALL,VERIFY_ROW,DRAFT_CALL,DRAFT_ROW "
        "(seconds or any unit)",
    )
    s.add_argument(
        "--driver",
        choices=DRIVERS,
        default=_default("driver"),
        help="threaded: draft and target on their own threads; sequential: one thread; "
        "simulated: a virtual clock",
    )


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    """Where the prompt comes from (an argument, ``-p``, ``-f``, stdin) and how it is
    wrapped (``--chat``, ``--system``)."""
    p.add_argument(
        "prompt",
        nargs="?",
        help="prompt text ('-': read stdin); for id-only models, token ids separated by "
        "spaces or commas. Without one, -p or -f, a piped stdin is the prompt",
    )
    g = p.add_argument_group("prompt")
    g.add_argument(
        "-p",
        "--prompt",
        dest="prompt_opt",
        metavar="TEXT",
        help="prompt text (default: the positional argument, else stdin)",
    )
    g.add_argument(
        "-f",
        "--file",
        dest="prompt_file",
        metavar="FILE",
        help="read the prompt from FILE ('-': stdin); UTF-8; one trailing newline dropped "
        "(default: none)",
    )
    g.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    g.add_argument(
        "--system",
        metavar="TEXT",
        help="system message for the chat template; implies --chat (default: none)",
    )


def add_output_args(p: argparse.ArgumentParser) -> None:
    """How generated text is shown (``--special``)."""
    p.add_argument(
        "--special",
        action="store_true",
        help="show end-of-text tokens (e.g. <|im_end|>) instead of hiding them",
    )


def unescape(text: str) -> str:
    r"""``\n``, ``\t``, ``\r`` and ``\\`` in ``text`` as the characters they name (what a
    shell cannot type easily); any other backslash is kept as it is."""
    out: list[str] = []
    i = 0
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in table:
            out.append(table[text[i + 1]])
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def sampling_from(args: argparse.Namespace) -> SamplingParams:
    """The :class:`SamplingParams` the flags describe.

    Raises:
        ConfigError: a value is out of range.
    """
    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        draft_temperature=args.draft_temperature,
        stop=tuple(unescape(s) for s in getattr(args, "stop", ()) or ()),
        ignore_eos=bool(getattr(args, "ignore_eos", False)),
    )


def _cost(text: str) -> Any:
    if text in ("declared", "measured"):
        return text
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        values = [float(p) for p in parts]
        if len(values) != 4:
            raise ValueError
        return CostModel(
            verify_call=values[0], verify_row=values[1], draft_call=values[2], draft_row=values[3]
        )
    except (ValueError, SSDError):
        raise argparse.ArgumentTypeError(
            f"--cost must be declared, measured or four numbers "
            f"VERIFY_CALL,VERIFY_ROW,DRAFT_CALL,DRAFT_ROW (each >= 0), got {text!r}"
        ) from None


def config_from(args: argparse.Namespace) -> SSDConfig:
    """The :class:`SSDConfig` the flags describe.

    Raises:
        ConfigError: a value is out of range, or ``--draft-min`` was given.
    """
    if getattr(args, "draft_min", None) is not None:
        raise ConfigError(
            "--draft-min is not supported yet: the engine has no minimum speculation length "
            "to set (SSDConfig has only the maximum, --draft-max)"
        )
    return SSDConfig(
        k=args.k,
        fanout=args.fanout,
        saguaro_c=args.saguaro_c,
        fallback=args.fallback,
        adaptive=getattr(args, "adaptive", _default("adaptive")),
        cost=getattr(args, "cost", _default("cost")),
    )


def check_decode_args(args: argparse.Namespace) -> tuple[SamplingParams, SSDConfig]:
    """Validate the decoding flags before any model is loaded.

    Raises:
        ConfigError: a bad value (named).
    """
    if args.max_new_tokens < -1:
        raise ConfigError(f"-n/--max-new-tokens must be >= -1, got {args.max_new_tokens}")
    if not 0 <= args.seed < 1 << 64:
        raise ConfigError(f"-s/--seed must be in [0, 2**64), got {args.seed}")
    return sampling_from(args), config_from(args)


def budget(args: argparse.Namespace, target: Model, prompt_len: int) -> int:
    """``-n`` as a token budget; ``-1`` runs until a stop or the target's context is full.

    Raises:
        ConfigError: ``-n -1`` on a model without a context size.
    """
    if args.max_new_tokens >= 0:
        return int(args.max_new_tokens)
    context = getattr(target, "context_size", None)
    if context is None:
        raise ConfigError(
            f"-n -1 needs a model with a context size; {getattr(target, 'name', '?')!r} has "
            "none: give -n N"
        )
    return int(context)  # more than fits: the engine stops at the context


# -- models --------------------------------------------------------------------------

#: Options only the llama.cpp backend reads: giving them to no llama model is an error.
_LLAMA_ONLY = {
    "flash_attn": "-fa/--flash-attn",
    "n_gpu_layers": "-ngl/--n-gpu-layers",
    "n_gpu_layers_draft": "-ngld/--n-gpu-layers-draft",
    "n_seq": "--n-seq",
}
#: The in-house backends that do not read them (a third-party backend may).
_NOT_LLAMA = {"reference", "ngram", "torch", "onnxruntime"}


def _split_spec(spec: str, default_backend: str) -> tuple[str, str]:
    name, sep, rest = spec.partition(":")
    if sep and name in available_backends():
        return name, rest
    return default_backend, spec


def _options(args: argparse.Namespace, role: str, slots: int | None) -> dict[str, Any]:
    draft = role == "draft"
    opts: dict[str, Any] = {
        "role": role,
        "threads": (args.draft_threads or args.threads) if draft else args.threads,
        "n_ctx": args.n_ctx,
        "n_gpu_layers": (
            args.n_gpu_layers_draft
            if draft and args.n_gpu_layers_draft is not None
            else args.n_gpu_layers
        ),
        "flash_attn": args.flash_attn,
        "device": (args.draft_device or args.device) if draft else args.device,
        "dtype": args.dtype,
        "verbose": bool(getattr(args, "verbose", False)),
    }
    if not draft:
        # The target holds one llama.cpp sequence per request in flight; each costs
        # n_ctx KV cells, so one slot lets -c grow 16 times further than the default.
        opts["n_seq_max"] = args.n_seq or slots
    return {k: v for k, v in opts.items() if v is not None}


def _plan(
    args: argparse.Namespace, need_draft: bool
) -> tuple[tuple[str, str], tuple[str, str] | None]:
    backend = load_backend(args.backend)
    target_spec = args.target or backend.default_target
    if target_spec is None:
        raise ConfigError(f"backend {args.backend!r} has no default model; pass -m SPEC")
    target = _split_spec(target_spec, args.backend)
    draft = None
    if need_draft:
        draft_spec = args.draft or backend.default_draft
        if draft_spec is None:
            raise ConfigError(f"backend {args.backend!r} has no default draft; pass -md SPEC")
        draft = _split_spec(draft_spec, args.backend)
    names = [target[0]] + ([draft[0]] if draft else [])
    if all(n in _NOT_LLAMA for n in names):
        for dest, flag in _LLAMA_ONLY.items():
            if getattr(args, dest, None) is not None:
                roles = ", ".join(f"{r}: {n}" for r, n in zip(("target", "draft"), names))
                raise ConfigError(f"{flag} applies to llama_cpp models only ({roles})")
    for name in set(names):
        load_backend(name)
    return target, draft


def check_model_args(args: argparse.Namespace, *, need_draft: bool) -> None:
    """Check the model flags without loading a model: backend names, a default model
    or draft to fall back on, llama.cpp-only flags used on llama.cpp models. Cheap, so
    a command calls it before reading a prompt or loading anything.

    Raises:
        UnknownOptionError: an unknown backend name.
        ConfigError: no model to use, or a llama.cpp-only flag with no llama.cpp model.
    """
    _plan(args, need_draft)


def load_models(
    args: argparse.Namespace,
    *,
    need_draft: bool,
    slots: int | None = None,
    quiet: bool = False,
) -> tuple[Model, Model | None]:
    """Build the target (and draft) the command line asks for, with a progress line.

    Args:
        args: the parsed flags (:func:`add_model_args`).
        need_draft: load a draft too.
        slots: llama_cpp sequence slots for the target when ``--n-seq`` is not given
            (``None``: the backend's default).
        quiet: no progress line (``--json``).

    Raises:
        UnknownOptionError: an unknown backend name.
        ConfigError: see :func:`check_model_args`; a bad option value.
        SSDError: the backend could not build the model (missing engine or file).
    """
    (t_name, t_args), draft_plan = _plan(args, need_draft)
    with Progress(f"loading target {t_name}:{t_args or 'default'}", enabled=not quiet):
        target = load_backend(t_name).load(t_args, _options(args, "target", slots))
    if draft_plan is None:
        return target, None
    d_name, d_args = draft_plan
    try:
        opts = _options(args, "draft", slots)
        opts.update(vocab_size=target.vocab_size, target=target, target_args=t_args)
        with Progress(f"loading draft {d_name}:{d_args or 'default'}", enabled=not quiet):
            draft = load_backend(d_name).load(d_args, opts)
    except BaseException:
        free_model(target)
        raise
    return target, draft


def free_models(*models: Model | None) -> None:
    """Release every model given (``None`` entries skipped)."""
    for m in models:
        if m is not None:
            free_model(m)
