"""Helpers for the command-line tests: run ``ssd`` in a child process (for pipes,
signals and exit codes) and the reference backend's flags."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: An id-only target and draft that need no engine.
REF = ["--backend", "reference", "-m", "reference:vocab=64,order=2,seed=1"]


def ssd_env() -> dict[str, str]:
    """The environment for a child ``ssd``: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("COLUMNS", None)
    return env


def ssd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ssd_core.app.cli", *args]


def run_ssd(
    *args: str, input: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    """Run ``ssd ARGS`` to the end (stdin from ``input``, or empty)."""
    return subprocess.run(
        ssd_command(*args),
        input=input if input is not None else b"",
        capture_output=True,
        env=ssd_env(),
        timeout=timeout,
        cwd=ROOT,
    )
