"""llama.cpp's own log lines stay off stderr unless ``verbose`` (issue 13).

Run in a child process: the log callback is process-wide and llama.cpp writes from C.
The child triggers warnings llama.cpp used to print even without ``verbose``
("n_ctx_seq > n_ctx_train", a failed load)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = """
import sys
from backends.llama_cpp import from_gguf
from ssd_core import ConfigError, SamplingParams, generate
verbose = sys.argv[2] == "1"
# n_ctx 5000 > the file's trained 4096: llama.cpp warns about the context overflow.
with from_gguf(sys.argv[1], n_threads=1, n_ctx=5000, n_seq_max=2, verbose=verbose) as m:
    ids = m.apply_chat_template([{"role": "user", "content": "the cat"}])
    generate(m, None, prompts=[ids], mode="ar", max_new_tokens=4,
             sampling=SamplingParams(temperature=0.0))
try:
    from_gguf(sys.argv[3], verbose=verbose)
except ConfigError as exc:
    print("refused:", exc)
"""


def run_child(tiny_gguf: Path, tmp_path: Path, verbose: bool) -> subprocess.CompletedProcess[str]:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)  # a GGUF header llama.cpp rejects, with errors
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(tiny_gguf), "1" if verbose else "0", str(bad)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_llama_cpp_is_silent_without_verbose(tiny_gguf: Path, tmp_path: Path) -> None:
    proc = run_child(tiny_gguf, tmp_path, verbose=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "refused:" in proc.stdout


def test_verbose_lets_llama_cpp_speak(tiny_gguf: Path, tmp_path: Path) -> None:
    proc = run_child(tiny_gguf, tmp_path, verbose=True)
    assert proc.returncode == 0, proc.stderr
    assert "n_ctx_train" in proc.stderr or "llama_context" in proc.stderr


def test_failed_load_quotes_llama_cpp(tiny_gguf: Path, tmp_path: Path) -> None:
    proc = run_child(tiny_gguf, tmp_path, verbose=False)
    refused = [line for line in proc.stdout.splitlines() if line.startswith("refused:")]
    assert refused and "could not load" in refused[0]


@pytest.mark.parametrize("level", ["DEBUG"])
def test_native_lines_reach_python_logging_at_debug(
    tiny_gguf: Path, caplog: pytest.LogCaptureFixture, level: str
) -> None:
    from backends.llama_cpp import from_gguf

    with caplog.at_level(level, logger="backends.llama_cpp.native"):
        from_gguf(tiny_gguf, n_threads=1, n_ctx=64).free()
    assert any(r.name == "backends.llama_cpp.native" for r in caplog.records)
