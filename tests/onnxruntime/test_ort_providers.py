"""Provider selection: CUDA when it really loads, CPU otherwise, and always reported."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ssd_core import ConfigError

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("torch")  # the fixtures are exported from torch

from backends.onnxruntime import (  # noqa: E402
    CPU,
    CUDA,
    OrtModel,
    _providers,  # noqa: E402
    create_session,
    cuda_load_error,
)
from backends.onnxruntime._runner import BoundRunner, PlainRunner  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _fresh_fallback_memory():
    """Each test starts as a fresh process would: no fallback seen or reported yet."""
    saved = (set(_providers._cuda_failed), set(_providers._reported))
    _providers._cuda_failed.clear()
    _providers._reported.clear()
    yield
    _providers._cuda_failed.clear()
    _providers._reported.clear()
    _providers._cuda_failed.update(saved[0])
    _providers._reported.update(saved[1])


class FallbackSession:
    """A real CPU session that was asked for CUDA: what onnxruntime-gpu gives without CUDA libs."""

    def __init__(self, path, providers, sess_options=None):
        self.asked = list(providers)
        self._real = onnxruntime.InferenceSession(path, sess_options=sess_options, providers=[CPU])

    def __getattr__(self, name):
        return getattr(self._real, name)


class PretendCudaSession(FallbackSession):
    """Reports CUDA as active (to check what the model does on CUDA, without running)."""

    def get_providers(self):
        return [CUDA, CPU]


def test_cuda_listed_but_not_loadable_falls_back_to_cpu(onnx_files, caplog):
    made = []

    def factory(path, providers, sess_options=None):
        made.append(FallbackSession(path, providers, sess_options))
        return made[-1]

    with caplog.at_level(logging.WARNING, logger="backends.onnxruntime"):
        m = OrtModel.from_file(
            onnx_files["target"], available=lambda: [CUDA, CPU], session_factory=factory
        )
    assert made[0].asked == [CUDA, CPU]  # CUDA was tried first
    assert m.provider == CPU
    assert m.providers.requested == (CUDA, CPU) and m.providers.fell_back
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "the CUDA provider could not be used" in warnings[0].getMessage()
    assert "running on the CPU" in warnings[0].getMessage()
    assert not m.io_binding and isinstance(m._run, PlainRunner) and m.batching == "padded"
    h = m.open([1, 2])
    assert m.extend([(h, [3])]).shape == (1, m.vocab_size)


def test_cpu_only_build_never_asks_for_cuda(onnx_files):
    made = []

    def factory(path, providers, sess_options=None):
        made.append(FallbackSession(path, providers, sess_options))
        return made[-1]

    m = OrtModel.from_file(onnx_files["target"], available=lambda: [CPU], session_factory=factory)
    assert made[0].asked == [CPU]
    assert m.provider == CPU and not m.providers.fell_back


def test_cuda_session_uses_iobinding_and_padding(onnx_files):
    m = OrtModel.from_file(
        onnx_files["target"],
        available=lambda: [CUDA, CPU],
        session_factory=PretendCudaSession,
        providers=[(CUDA, {"device_id": 1}), CPU],
    )
    assert m.provider == CUDA and not m.providers.fell_back
    assert m.io_binding and m.batching == "padded"
    assert isinstance(m._run, BoundRunner) and (m._run.device_type, m._run.device_id) == ("cuda", 1)


def test_real_default_selection_reports_what_runs(onnx_files):
    # On this machine onnxruntime-gpu lists CUDA without its libraries; whatever the
    # machine, the reported provider is the one the session really uses.
    m = OrtModel.from_file(onnx_files["target"])
    assert m.provider == m._session.get_providers()[0]
    assert m.provider in onnxruntime.get_available_providers()
    assert m.providers.fell_back == (
        CUDA in onnxruntime.get_available_providers() and m.provider != CUDA
    )
    h = m.open([1])
    assert np.isfinite(m.extend([(h, [2, 3])])).all()


def test_unlisted_providers_are_a_config_error(onnx_files):
    with pytest.raises(ConfigError, match="none of the providers"):
        create_session(onnx_files["target"], providers=["NoSuchExecutionProvider"])
    with pytest.raises(ConfigError):
        create_session(onnx_files["target"], providers=[])
    # an unlisted one among listed ones is skipped
    _, choice = create_session(onnx_files["target"], providers=["NoSuchExecutionProvider", CPU])
    assert choice.requested == (CPU,) and choice.provider == CPU


def test_iobinding_on_cpu_is_bit_identical_to_run(onnx_files, oh):
    a = oh.load(onnx_files["target"], io_binding=False)
    b = oh.load(onnx_files["target"], io_binding=True)
    assert isinstance(b._run, BoundRunner) and b._run.device_type == "cpu"
    ha, hb = a.open([5, 6]), b.open([5, 6])
    np.testing.assert_array_equal(a.extend([(ha, [7, 8])]), b.extend([(hb, [7, 8])]))
    np.testing.assert_array_equal(a.extend([(ha, [9])]), b.extend([(hb, [9])]))


def test_bad_options(onnx_files, tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        OrtModel.from_file(tmp_path / "missing.onnx")
    with pytest.raises(ConfigError, match="batching"):
        OrtModel.from_file(onnx_files["target"], providers=[CPU], batching="fast")
    with pytest.raises(ConfigError, match="threads"):
        OrtModel.from_file(onnx_files["target"], providers=[CPU], threads=0)
    with pytest.raises(ConfigError, match="vocab_size"):
        OrtModel.from_file(onnx_files["target"], providers=[CPU], vocab_size=7)


def test_spinning_and_threads_options_reach_the_session(onnx_files):
    seen = {}

    def factory(path, providers, sess_options=None):
        seen["threads"] = sess_options.intra_op_num_threads
        seen["spin"] = sess_options.get_session_config_entry("session.intra_op.allow_spinning")
        return onnxruntime.InferenceSession(path, sess_options=sess_options, providers=providers)

    OrtModel.from_file(
        onnx_files["target"], providers=[CPU], threads=1, spinning=False, session_factory=factory
    )
    assert seen == {"threads": 1, "spin": "0"}


def test_a_fallback_is_reported_once_and_not_retried(onnx_files, caplog):
    made = []

    def factory(path, providers, sess_options=None):
        made.append(FallbackSession(path, providers, sess_options))
        return made[-1]

    with caplog.at_level(logging.INFO, logger="backends.onnxruntime"):
        a = OrtModel.from_file(
            onnx_files["target"], available=lambda: [CUDA, CPU], session_factory=factory
        )
        b = OrtModel.from_file(
            onnx_files["draft"], available=lambda: [CUDA, CPU], session_factory=factory
        )
        # an explicit request still tries CUDA, and is not reported twice either
        c = OrtModel.from_file(
            onnx_files["draft"], available=lambda: [CUDA, CPU], session_factory=factory,
            providers=[CUDA, CPU],
        )  # fmt: skip
    assert [s.asked for s in made] == [[CUDA, CPU], [CPU], [CUDA, CPU]]
    assert a.provider == b.provider == c.provider == CPU
    assert not b.providers.fell_back  # it asked for the CPU only
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_onnxruntimes_own_log_is_held_back_while_the_session_is_made(onnx_files, monkeypatch):
    levels = []
    monkeypatch.setattr(onnxruntime, "set_default_logger_severity", levels.append)

    def factory(path, providers, sess_options=None):
        levels.append("session")
        return FallbackSession(path, providers, sess_options)

    OrtModel.from_file(onnx_files["target"], available=lambda: [CUDA, CPU], session_factory=factory)
    assert levels == [4, "session", 2]  # fatal only while CUDA is tried, then the default
    levels.clear()
    OrtModel.from_file(
        onnx_files["target"], available=lambda: [CUDA, CPU], session_factory=factory,
        providers=[CUDA, CPU], engine_logs=True,
    )  # fmt: skip
    assert levels == ["session"]  # -v: onnxruntime speaks for itself
    levels.clear()
    OrtModel.from_file(onnx_files["target"], providers=[CPU], session_factory=factory)
    assert levels == ["session"]  # nothing to hide on the CPU provider


@pytest.mark.skipif(
    CUDA not in onnxruntime.get_available_providers() or cuda_load_error() is None,
    reason="needs onnxruntime-gpu whose CUDA provider cannot load (as on CPU-only machines)",
)
def test_real_cuda_failure_costs_one_line_on_stderr():
    # without --device: onnxruntime-gpu lists CUDA, the session falls back to the CPU
    out = subprocess.run(
        [sys.executable, "-m", "ssd_core.app.cli", "generate", "--backend", "onnxruntime"]
        + ["-n", "3", "-t", "1", "1 2 3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "[E:onnxruntime" not in out.stderr and "[W:onnxruntime" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if "CUDA" in line]
    assert len(lines) == 1, out.stderr
    assert "running on the CPU" in lines[0] and cuda_load_error().split(":")[0] in lines[0]
    assert len(out.stdout.split()) == 3
