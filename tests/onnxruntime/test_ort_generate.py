"""Greedy identity AR == SD == SSD with two exported tiny Llamas, through the registry too."""

from __future__ import annotations

import pytest

from ssd_core import SamplingParams, SSDConfig, generate
from ssd_core.app import load_backend

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("torch")  # the fixtures are exported from torch


GREEDY = SamplingParams(temperature=0.0)
PROMPTS = [[3, 17, 42], [5], [60, 61, 62, 63, 1]]


@pytest.mark.parametrize("batching", ["sequential", "padded"])
def test_greedy_identity_target_and_smaller_draft(onnx_files, oh, batching):
    target = oh.load(onnx_files["target"], batching=batching)
    draft = oh.load(onnx_files["draft"], batching=batching)
    assert draft.vocab_size == target.vocab_size
    ar = generate(target, None, prompts=PROMPTS, mode="ar", max_new_tokens=12, sampling=GREEDY)
    for mode in ("sd", "ssd"):
        out = generate(
            target,
            draft,
            prompts=PROMPTS,
            mode=mode,
            max_new_tokens=12,
            sampling=GREEDY,
            config=SSDConfig(k=3, fanout=6),
        )
        assert out.tokens == ar.tokens, mode
    assert target.open_handles == 0 and draft.open_handles == 0


def test_greedy_identity_threaded_ssd_and_recompute_target(onnx_files, oh):
    target = oh.load(onnx_files["target"])
    nocache = oh.load(onnx_files["target_nocache"])
    draft = oh.load(onnx_files["draft"])
    ar = generate(target, None, prompts=PROMPTS[:2], mode="ar", max_new_tokens=8, sampling=GREEDY)
    assert (
        generate(
            nocache, None, prompts=PROMPTS[:2], mode="ar", max_new_tokens=8, sampling=GREEDY
        ).tokens
        == ar.tokens
    )
    out = generate(
        target,
        draft,
        prompts=PROMPTS[:2],
        mode="ssd",
        max_new_tokens=8,
        sampling=GREEDY,
        config=SSDConfig(k=2, fanout=4),
        driver="threaded",
    )
    assert out.tokens == ar.tokens


def test_self_draft_accepts_everything(onnx_files, oh):
    target = oh.load(onnx_files["target"])
    draft = oh.load(onnx_files["target"])
    out = generate(
        target,
        draft,
        prompts=[[1, 2]],
        mode="sd",
        max_new_tokens=16,
        sampling=GREEDY,
        config=SSDConfig(k=4),
    )
    assert out.metrics.accepted_per_proposed == 1.0


def test_sampling_runs_and_is_seeded(onnx_files, oh):
    target = oh.load(onnx_files["target"])
    draft = oh.load(onnx_files["draft"])
    kw = dict(
        prompts=PROMPTS,
        mode="ssd",
        max_new_tokens=10,
        sampling=SamplingParams(temperature=1.0),
        config=SSDConfig(k=3, fallback="neural"),
        seed=7,
    )  # "auto" uses measured times
    assert generate(target, draft, **kw).tokens == generate(target, draft, **kw).tokens


def test_backend_registry_loads_onnx_paths(onnx_files):
    spec = load_backend("onnxruntime")
    assert spec.name == "onnxruntime"
    model = spec.load(
        f"path={onnx_files['target']},providers=CPUExecutionProvider,batching=padded,threads=1",
        {"n_ctx": 32, "device": "cuda:0"},  # the spec's providers win over the CLI device
    )
    assert (
        model.context_size == 32
        and model.batching == "padded"
        and model.provider == "CPUExecutionProvider"
    )
    plain = spec.load(onnx_files["draft"], {})
    assert plain.name == "draft"


def test_builtin_tiny_pair_and_cli_device_option():
    spec = load_backend("onnxruntime")
    target = spec.load("tiny-target", {"device": "cpu", "threads": 1})
    draft = spec.load("tiny-draft", {"device": "cpu"})
    assert target.provider == "CPUExecutionProvider" and target.providers.requested == (
        "CPUExecutionProvider",
    )
    assert (target.name, draft.name, target.vocab_size) == ("target", "draft", draft.vocab_size)
    out = generate(target, draft, prompts=[[1, 2]], mode="ssd", max_new_tokens=4, sampling=GREEDY)
    assert len(out.tokens[0]) == 4


def test_device_option_is_validated():
    from backends.onnxruntime import _device_providers
    from ssd_core import ConfigError

    assert _device_providers("cuda:2")[0] == ("CUDAExecutionProvider", {"device_id": 2})
    with pytest.raises(ConfigError):
        _device_providers("tpu")
    with pytest.raises(ConfigError):
        _device_providers("cuda:x")
