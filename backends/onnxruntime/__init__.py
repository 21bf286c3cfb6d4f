"""The ONNX Runtime backend: decoder-only ONNX graphs on CUDA, with CPU fallback.

``OrtModel.from_file("model.onnx")`` runs a graph with the Hugging Face / Optimum I/O
convention (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.N.key/value`` -> ``logits``, ``present.N.key/value``; see
``docs/onnxruntime.md``). The CUDA execution provider is used when it really loads,
the CPU provider otherwise; ``model.provider`` says which.

Model specs for the CLI: ``onnxruntime:PATH`` (an ``.onnx`` file or a folder holding
one) or
``onnxruntime:path=PATH,batching=padded,threads=2,context=256,providers=CPUExecutionProvider,tokenizer=DIR``;
``onnxruntime:tiny-target`` (the default target) / ``tiny-draft`` export the tiny
random test pair to a temporary folder on first use (needs torch and onnx). The default
draft is the n-gram draft. Text prompts need a tokenizer: the files ``ssd export-onnx``
writes beside the graph, or ``tokenizer=PATH``.

This package imports ``onnxruntime`` (the real one: imports here are absolute, and the
package's full name is ``backends.onnxruntime``); ``torch``/``onnx`` only in the exporter.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ssd_core import ConfigError, Model
from ssd_core.app import BackendSpec

from .._specs import Keys, flag, parse_spec_items, plus_list
from ._export import (
    MAX_IR_VERSION,
    OPSET,
    build_tiny_llama,
    export_module,
    export_test_pair,
    export_tiny_llama,
    from_hf_llama,
)
from ._model import BATCHING, OrtModel
from ._pretrained import ExportReport, export_pretrained
from ._providers import CPU, CUDA, ProviderChoice, create_session, cuda_load_error
from ._signature import GraphSignature, read_signature

__all__ = [
    "BACKEND",
    "BATCHING",
    "BUILTIN",
    "CPU",
    "CUDA",
    "ExportReport",
    "MAX_IR_VERSION",
    "OPSET",
    "GraphSignature",
    "OrtModel",
    "ProviderChoice",
    "build_tiny_llama",
    "create_session",
    "cuda_load_error",
    "export_module",
    "export_pretrained",
    "export_test_pair",
    "export_tiny_llama",
    "from_hf_llama",
    "parse_spec",
    "read_signature",
]

_KEYS: Keys = {
    "threads": ("threads", int),
    "context": ("context_size", int),
    "context_size": ("context_size", int),
    "vocab": ("vocab_size", int),
    "vocab_size": ("vocab_size", int),
    "max_handles": ("max_handles", int),
    "path": ("path", str),
    "batching": ("batching", str),
    "name": ("name", str),
    "providers": ("providers", plus_list),
    "io_binding": ("io_binding", flag),
    "spinning": ("spinning", flag),
    "tokenizer": ("tokenizer", str),
}


def parse_spec(args: str) -> dict[str, Any]:
    """Parse ``PATH`` or ``path=PATH,key=value,...`` into :meth:`OrtModel.from_file` arguments.

    Keys: ``path`` (an ``.onnx`` file or a folder holding one), ``threads``, ``context``,
    ``vocab``, ``max_handles``, ``batching``, ``name``, ``providers`` (``+``-separated
    provider names), ``io_binding`` and ``spinning`` (0/1), ``tokenizer`` (a folder with
    tokenizer files or a GGUF file; default: the files beside the graph, if any).

    Raises:
        ConfigError: an unknown key, a bad value, or no path.
    """
    out = parse_spec_items(args, owner="onnxruntime", keys=_KEYS, positional="path")
    if "path" not in out:
        raise ConfigError("onnxruntime spec needs an .onnx path: onnxruntime:PATH[,key=value...]")
    return out


#: Built-in spec names: the tiny random test pair, exported on first use (needs torch).
BUILTIN = ("tiny-target", "tiny-draft")


@functools.lru_cache(maxsize=1)
def _tiny_pair() -> tuple[str, str]:
    folder = tempfile.mkdtemp(prefix="ssd-onnx-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return export_test_pair(folder)


def _device_providers(device: str) -> list[Any] | None:
    """``cpu`` -> CPU only; ``cuda`` / ``cuda:N`` -> CUDA device N, then CPU."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return [CPU]
    if kind == "cuda":
        try:
            return [(CUDA, {"device_id": int(index or 0)}), CPU]
        except ValueError:
            raise ConfigError(f"bad device {device!r}; use cpu, cuda or cuda:N") from None
    raise ConfigError(f"bad device {device!r}; use cpu, cuda or cuda:N")


def _load(args: str, options: Mapping[str, Any]) -> OrtModel:
    """``onnxruntime:PATH[,key=value...]`` or ``onnxruntime:tiny-target`` / ``tiny-draft``.

    The CLI's ``threads``, ``n_ctx`` and ``device`` options apply where the spec does not
    set threads, context or providers.
    """
    if args.strip() in BUILTIN:
        target, draft = _tiny_pair()
        args = target if args.strip() == "tiny-target" else draft
    kw = parse_spec(args)
    if options.get("threads") is not None:
        kw.setdefault("threads", int(options["threads"]))
    if options.get("n_ctx") is not None:
        kw.setdefault("context_size", int(options["n_ctx"]))
    if options.get("device") is not None and "providers" not in kw:
        kw["providers"] = _device_providers(str(options["device"]))
    kw["engine_logs"] = bool(options.get("verbose", False))
    path = kw.pop("path")
    return OrtModel.from_file(path, **kw)


BACKEND = BackendSpec(
    name="onnxruntime",
    load=_load,
    default_target="onnxruntime:tiny-target",
    # the n-gram draft has the target's vocabulary whatever graph the target is (the
    # tiny pair's draft only fits the tiny target: -md onnxruntime:tiny-draft)
    default_draft="ngram:max_n=3,alpha=1e-8",
    description="decoder-only ONNX graphs with a KV cache on onnxruntime (CUDA provider, CPU fallback)",
    conformance_target="onnxruntime:tiny-target",
)


if TYPE_CHECKING:

    def _is_a_model(model: OrtModel) -> Model:
        """mypy proves here that OrtModel meets the Model protocol."""
        return model
