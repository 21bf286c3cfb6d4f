"""The torch backend declares what a call costs, from the network's size and device, so
the speculation policy plans with this model's costs (not a GPU-like assumption)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from backends.torch import TinyTransformer, TorchModel  # noqa: E402
from backends.torch._model import declared_latency  # noqa: E402
from ssd_core import CostModel  # noqa: E402

VOCAB = 96


def _net(dtype=torch.float32):
    return TinyTransformer(vocab_size=VOCAB, seed=0, max_positions=64).to(dtype=dtype)


def test_cpu_costs_follow_the_weights_and_the_threads():
    net = _net()
    n = sum(p.numel() for p in net.parameters())
    one = declared_latency(net, torch.device("cpu"), 1)
    two = declared_latency(net, torch.device("cpu"), 2)
    assert one.per_call == pytest.approx(4 * n / 1.0e10)  # fp32: 4 bytes a weight
    assert one.per_token == pytest.approx(2 * n / 4.5e10)
    assert two.per_token == pytest.approx(one.per_token / 2) and two.per_call == one.per_call
    half = declared_latency(_net(torch.bfloat16), torch.device("cpu"), 1)
    assert half.per_call == pytest.approx(one.per_call / 2)


def test_a_gpu_pass_is_memory_bound():
    net = _net()
    gpu = declared_latency(net, torch.device("cuda", 0), 1)
    assert gpu.per_token < 0.05 * gpu.per_call  # rows nearly free next to the pass


def test_the_model_declares_it_and_the_policy_reads_it():
    model = TorchModel.from_module(_net(), device="cpu")
    assert model.latency == declared_latency(model.network, torch.device("cpu"),
                                             torch.get_num_threads())  # fmt: skip
    cost = CostModel.from_models(model, model)
    assert cost.verify_call == model.latency.per_call
    assert cost.draft_row == model.latency.per_token
