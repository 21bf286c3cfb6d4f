"""The exporter writes graphs onnxruntime can read, with the documented signature."""

from __future__ import annotations

import pytest

from ssd_core import ConfigError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("torch")  # the fixtures are exported from torch

import onnx  # noqa: E402

from backends.onnxruntime import (  # noqa: E402
    MAX_IR_VERSION,
    build_tiny_llama,
    export_test_pair,
    export_tiny_llama,
    parse_spec,
)


def test_ir_version_and_metadata(onnx_files):
    for path in onnx_files.values():
        proto = onnx.load(path)
        assert proto.ir_version <= MAX_IR_VERSION
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["context_size"] == "64"
    onnx.checker.check_model(onnx.load(onnx_files["target"]))


def test_signature_names(onnx_files, oh):
    sig = oh.load(onnx_files["target"]).signature
    assert sig.past_names == (
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
    )
    assert sig.present_names == tuple(
        n.replace("past_key_values", "present") for n in sig.past_names
    )
    assert (sig.kv_heads, sig.head_dim, sig.has_mask, sig.has_positions) == (2, 8, True, True)


def test_export_tiny_llama_kwargs(tmp_path, oh):
    path = export_tiny_llama(
        tmp_path / "m.onnx",
        name="small",
        vocab_size=10,
        num_layers=1,
        hidden_size=8,
        num_heads=2,
        num_kv_heads=1,
        context_size=16,
    )
    m = oh.load(path)
    assert (m.name, m.vocab_size, m.context_size, m.signature.num_layers) == ("small", 10, 16, 1)


def test_export_rejects_bad_sizes():
    with pytest.raises(ConfigError):
        build_tiny_llama(hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError):
        build_tiny_llama(num_heads=4, num_kv_heads=3)


def test_parse_spec():
    assert parse_spec("m.onnx") == {"path": "m.onnx"}
    assert parse_spec(
        "path=m.onnx,threads=2,context=9,providers=A+B,io_binding=1,batching=padded,spinning=0"
    ) == {
        "path": "m.onnx",
        "threads": 2,
        "context_size": 9,
        "providers": ["A", "B"],
        "io_binding": True,
        "spinning": False,
        "batching": "padded",
    }
    for bad in (
        "",
        "threads=2",
        "path=m.onnx,colour=red",
        "path=m.onnx,threads=x",
        "a.onnx,b.onnx",
    ):
        with pytest.raises(ConfigError):
            parse_spec(bad)


def test_export_test_pair(tmp_path, oh):
    t, d = (oh.load(p) for p in export_test_pair(tmp_path, vocab_size=20))
    assert t.vocab_size == d.vocab_size == 20
    assert (t.signature.num_layers, d.signature.num_layers) == (2, 1)
