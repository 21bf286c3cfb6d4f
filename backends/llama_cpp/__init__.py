"""The llama.cpp backend: GGUF models through llama-cpp-python's low-level API.

Importing this package imports ``llama_cpp``; ``backends`` itself never does, so the
rest of the library works without the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ssd_core import Model
from ssd_core.app import BackendSpec, default_prompts

from ._bundled import resolve_model_path, smollm2_path
from ._model import LlamaCppModel
from ._options import LlamaOptions
from ._tokenizer import LlamaTokenizer

__all__ = [
    "BACKEND",
    "LlamaCppModel",
    "LlamaOptions",
    "LlamaTokenizer",
    "bundled_prompts",
    "from_gguf",
    "smollm2_path",
]


def from_gguf(path: str | Path, **options: Any) -> LlamaCppModel:
    """Load a GGUF model; see :meth:`LlamaCppModel.from_gguf` for the options.

    Raises:
        ConfigError: missing file, unloadable model, or an invalid option.
    """
    return LlamaCppModel.from_gguf(path, **options)


def _load(args: str, options: Mapping[str, Any]) -> Model:
    """``llama_cpp:PATH`` (or ``llama_cpp:smollm2``); options as in :class:`LlamaOptions`,
    unknown option names ignored (the CLI passes options meant for other backends).

    With ``options["role"] == "draft"`` the defaults change to ``batch_invariant=False``
    (one unified KV pool: forks share prefix cells; a draft's logits need not be
    history-independent, the core records the q it used) and ``n_seq_max=64`` (room for
    the speculation tree's branches). A target keeps per-sequence KV streams and starts
    with one sequence slot, growing up to ``n_seq_max`` as handles open; pass ``n_seq``
    (e.g. the number of prompts) to allocate them at once.

    Options worth exposing on a command line: ``flash_attn`` (``off`` reproduces
    llama-cpp-python's default greedy tokens), ``n_seq_max``/``n_seq``, ``verbose``
    (llama.cpp's own log), ``allow_special`` (parse control-token text in user text),
    ``n_batch``, ``extra_bufts``."""
    path = resolve_model_path(args)
    if options.get("role") == "draft":
        options = {"batch_invariant": False, "n_seq_max": 64, **options}
    # LlamaCppModel.tokenizer is the narrower LlamaTokenizer; protocol attributes are invariant.
    return cast(Model, LlamaCppModel(path, LlamaOptions.from_mapping(options)))


BACKEND = BackendSpec(
    name="llama_cpp",
    load=_load,
    default_target="llama_cpp:smollm2",
    default_draft="ngram:max_n=3,alpha=1e-8",
    description="GGUF models on llama.cpp (CPU; GPU when llama-cpp-python is built for it)",
    conformance_target="llama_cpp:tiny",
)


def bundled_prompts(model: LlamaCppModel | None = None) -> list[dict[str, Any]]:
    """The project's prompt set (:func:`ssd_core.app.default_prompts`: code, chat,
    math, prose, rewrite), the one ``ssd bench`` uses.

    Args:
        model: if given, each entry gains ``"tokens"``: the prompt tokenised with the
            model's tokenizer, through its chat template where the entry says ``chat``.

    Returns:
        One dict per prompt with ``id``, ``kind``, ``chat``, ``text`` (and ``tokens``).
    """
    prompts = default_prompts()
    if model is not None:
        for p in prompts:
            if p["chat"]:
                p["tokens"] = model.apply_chat_template([{"role": "user", "content": p["text"]}])
            else:
                p["tokens"] = model.tokenizer.encode(p["text"])
    return prompts


if TYPE_CHECKING:

    def _is_a_model(model: LlamaCppModel) -> Model:
        """mypy proves here that LlamaCppModel meets the Model protocol."""
        return model
