"""``ssd export-onnx SRC OUT``: a Hugging Face folder, a GGUF file or the bundled
``smollm2`` to an ONNX graph with its tokenizer beside it, ready for ``ssd generate
--backend onnxruntime -m OUT "text"``.

The work is the onnxruntime backend's (``export_pretrained``), found through the
backend registry like every backend, so this module imports no engine; it shows one
progress line per step on stderr and prints the graph's path (or, with ``--json``, the
report) on stdout.
"""

from __future__ import annotations

import argparse
import json
from importlib import import_module
from typing import Any

from ssd_core import ConfigError

from .console import Progress, note, write_stdout
from .registry import available_backends

__all__ = ["DTYPES", "run_export"]

#: The graph dtypes the exporter writes.
DTYPES = ("float32", "float16", "bfloat16")


def _exporter() -> Any:
    """``export_pretrained`` of the installed onnxruntime backend.

    Raises:
        ConfigError: the backend (or what it imports) is not installed.
    """
    target = available_backends().get("onnxruntime")
    if target is None:
        raise ConfigError("export-onnx needs the onnxruntime backend, which is not installed")
    try:
        module = import_module(target.partition(":")[0])
    except ImportError as exc:
        raise ConfigError(
            f"export-onnx needs the onnxruntime backend: {exc} (pip install 'ssd-saguaro[onnx]')"
        ) from exc
    export = getattr(module, "export_pretrained", None)
    if export is None:
        raise ConfigError(f"the onnxruntime backend at {target!r} has no export_pretrained")
    return export


class _Steps:
    """One :class:`Progress` line per step: each call ends the previous step's line."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._current: Progress | None = None

    def __call__(self, text: str) -> None:
        self.close(None)
        self._current = Progress(text, enabled=self.enabled, delay=0.0)
        self._current.__enter__()

    def close(self, exc_type: type[BaseException] | None) -> None:
        if self._current is not None:
            self._current.__exit__(exc_type, None, None)
            self._current = None


def run_export(args: argparse.Namespace) -> int:
    """``ssd export-onnx``: returns the exit code (0; errors raise :class:`ConfigError`)."""
    export = _exporter()
    steps = _Steps(enabled=not args.json)
    try:
        report = export(
            args.src,
            args.out,
            dtype=args.dtype,
            overwrite=args.force,
            check=args.check,
            threads=args.threads,
            progress=steps,
        )
    except BaseException as exc:
        steps.close(type(exc))
        raise
    steps.close(None)
    if args.json:
        obj = {
            "path": report.path,
            "folder": report.folder,
            "name": report.name,
            "dtype": report.dtype,
            "size_bytes": report.size_bytes,
            "tokenizer_files": list(report.tokenizer_files),
            "seconds": report.seconds,
            "check": report.check,
        }
        write_stdout(json.dumps(obj) + "\n")
        return 0
    tok = (
        f"tokenizer: {', '.join(report.tokenizer_files)}"
        if report.tokenizer_files
        else "no tokenizer (prompts as token ids)"
    )
    note(f"wrote {report.path} ({report.size_bytes / 2**20:.0f} MiB, {report.dtype}); {tok}")
    if report.check is not None:
        c = report.check
        note(
            f"check against transformers over {c['positions']:.0f} positions: max |logit "
            f"difference| {c['max_abs_diff']:.2e}, top-1 agreement {c['top1_agreement']:.3f}"
        )
    note(f'run it: ssd generate --backend onnxruntime -m {report.folder} "Hello"')
    write_stdout(report.path + "\n")
    return 0
