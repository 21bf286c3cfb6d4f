"""Device, dtype and stream branches, parametrised so they all run on a CPU-only machine."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from backends.torch._device import DeviceContext, parse_device, parse_dtype  # noqa: E402
from ssd_core import ConfigError  # noqa: E402

PROMPT = [3, 17, 42, 5, 88, 1, 60]
DEVICES = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_stream", [False, True])
def test_streams_and_devices(kind, device, use_stream, th):
    model = th.make_model(kind, device=device, use_stream=use_stream)
    assert (model._ctx.stream is not None) == use_stream
    h = model.open(PROMPT)
    out = model.extend([(h, [1, 2])])
    assert out.device.type == torch.device(device).type
    ref = th.full_logits(model, PROMPT + [1, 2])[-2:]
    assert torch.allclose(out.cpu(), ref.cpu(), atol=1e-4)
    g = model.fork(h, 3)
    out = model.extend([(h, [3]), (g, [4, 5])])
    assert out.shape == (3, th.VOCAB)


def test_default_stream_choice():
    assert DeviceContext(torch.device("cpu")).stream is None
    assert DeviceContext(torch.device("cpu"), use_stream=True).stream is not None


def test_hand_over_is_noop_on_cpu():
    ctx = DeviceContext(torch.device("cpu"), use_stream=True)
    with ctx():
        x = torch.ones(3)
        assert torch.is_inference(x)
    assert ctx.hand_over(x) is x


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_reduced_precision_returns_float32(kind, dtype, th):
    model = th.make_model(kind, dtype=dtype)
    assert next(model.network.parameters()).dtype == parse_dtype(dtype)
    h = model.open(PROMPT)
    out = model.extend([(h, [1, 2])])
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    ref = th.full_logits(model, PROMPT + [1, 2])[-2:]
    assert torch.allclose(out, ref.float(), atol=5e-2 if dtype != "float32" else 1e-4)
    # batched and separate agree to the dtype's precision
    g = model.fork(h, 4)
    both = model.extend([(h, [7]), (g, [8])])
    assert torch.allclose(both[1], th.full_logits(model, PROMPT[:4] + [8])[-1], atol=0.1)


def test_parse_dtype_and_device():
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype(torch.float16) is torch.float16
    assert parse_dtype(None) is torch.float32
    with pytest.raises(ConfigError):
        parse_dtype(torch.int32)
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError):
        parse_device("nonsense:0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError):
            parse_device("cuda")


def test_move_between_devices_keeps_results(th):
    """from_module moves a module (in place) to the requested device and dtype."""
    net = th.tiny_llama(0)
    a = th.make_model("llama")
    model = type(a).from_module(net, device="cpu", dtype="float32")
    h = model.open(PROMPT)
    assert torch.allclose(model.extend([(h, [1])]), a.extend([(a.open(PROMPT), [1])]), atol=1e-5)


def test_registry_and_spec_loading():
    from ssd_core.app import available_backends, load_backend

    assert available_backends()["torch"] == "backends.torch:BACKEND"
    spec = load_backend("torch")
    model = spec.load(
        "tiny,vocab=50,seed=3,layers=1", {"device": "cpu", "dtype": "float32", "batching": "loop"}
    )
    assert model.vocab_size == 50 and model.batching == "loop"
    h = model.open([1, 2])
    assert model.extend([(h, [3])]).shape == (1, 50)
    with pytest.raises(ConfigError):
        spec.load("tiny,colour=3", {})
    with pytest.raises(ConfigError):
        spec.load("/no/such/model", {})


def test_prune_layers(th):
    from backends.torch._model import _prune_layers

    net = th.tiny_llama(0, layers=3)
    _prune_layers(net, 2)
    assert len(net.model.layers) == 2 and net.config.num_hidden_layers == 2
    model = type(th.make_model("plain")).from_module(net)
    h = model.open([1, 2, 3])
    assert model.extend([(h, [4])]).shape == (1, th.VOCAB)
    with pytest.raises(ConfigError):
        _prune_layers(net, 5)
