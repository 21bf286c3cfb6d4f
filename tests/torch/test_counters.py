"""The host-sync and copy counters, and the backend's own count: zero syncs per call."""

from __future__ import annotations

import collections

import pytest

torch = pytest.importorskip("torch")

from backends.torch import Placement, TorchModel, count_copies, count_host_syncs  # noqa: E402
from ssd_core import ConfigError, SamplingParams, SSDConfig, generate  # noqa: E402


def test_each_kind_of_sync_is_counted_when_simulated():
    x = torch.arange(6.0)
    with count_host_syncs(simulate=True) as c:
        x[0].item()
        bool(x[1])
        int(x[2])
        float(x[3])
        x.tolist()
        x.numpy()
        x.cpu()
        torch.tensor([1, 2], device="cpu")
        torch.asarray([1], device=x.device)
        torch.nonzero(x)
        x[x > 2]
        x.to("cpu")
        torch.tensor([1, 2])  # host data made on the host: no sync
        x.to(torch.float64)  # a dtype change on the device: no sync
        x + 1
    kinds = c.by_kind
    for kind in (
        "item",
        "__bool__",
        "__int__",
        "__float__",
        "tolist",
        "cpu",
        "numpy",
        "upload:tensor",
        "upload:asarray",
        "nonzero",
        "bool-mask index",
        "download:to",
    ):
        assert kinds[kind] == 1, kind
    assert c.total == 12


def test_cpu_tensors_are_not_syncs_unless_simulated():
    x = torch.arange(3.0)
    with count_host_syncs() as c:
        x[0].item()
        x.tolist()
        torch.tensor([1], device="cpu")
    assert c.total == 0


def test_sites_are_recorded():
    x = torch.ones(2)
    with count_host_syncs(simulate=True, sites=True) as c:
        bool(x[0])
    (site,) = c.sites
    assert "test_counters.py" in site and site.endswith("__bool__")


def test_copy_counter():
    a, b = torch.zeros(4, 8), torch.zeros(4, 8)
    dst = torch.zeros(2, 10, 3)
    with count_copies() as c:
        torch.cat([a, b])
        dst.index_copy_(1, torch.tensor([0, 1]), torch.ones(2, 2, 3))
        a + b  # arithmetic is not a copy
    assert c.by_op["cat"] == 2 * 4 * 8 * 4
    assert c.by_op["index_copy_"] == 12 * 4
    assert c.total == 256 + 48


class _Counted:
    """A model proxy: host syncs and calls inside the backend's own methods."""

    def __init__(self, model) -> None:
        self._model = model
        self.syncs: collections.Counter[str] = collections.Counter()
        self.calls = 0

    def __getattr__(self, name):
        attr = getattr(self._model, name)
        if name not in ("open", "extend", "fork", "truncate", "close"):
            return attr

        def counted(*args, **kwargs):
            with count_host_syncs(simulate=True) as c:
                out = attr(*args, **kwargs)
            self.syncs.update(c.by_kind)
            self.calls += 1
            return out

        return counted


@pytest.mark.parametrize("mode", ["ar", "sd", "ssd"])
@pytest.mark.parametrize("batch", [1, 4])
def test_backend_makes_no_host_syncs(th, kind, mode, batch):
    """Regression guard: no torch call inside the backend would block the host on a GPU
    (ids, positions and masks are built on the device; results are never read back)."""
    target = _Counted(th.make_model(kind))
    draft = _Counted(th.make_model(kind, seed=1))
    prompts = [[3, 17, 42, 5, 88][: 2 + i] for i in range(batch)]
    generate(
        target,
        draft,
        prompts=prompts,
        mode=mode,
        max_new_tokens=10,
        sampling=SamplingParams(temperature=0.0),
        config=SSDConfig(k=3, fanout=4),
    )
    assert target.calls > 0
    assert sum(target.syncs.values()) == 0, target.syncs
    assert sum(draft.syncs.values()) == 0, draft.syncs


def test_check_finite_costs_one_sync_per_call(th):
    model = th.make_model("plain", check_finite=True)
    h = model.open([1, 2, 3])
    with count_host_syncs(simulate=True) as c:
        model.extend([(h, [4])])
    assert c.total == 1


# -- placement -------------------------------------------------------------------------


def test_placement_from_a_device_map():
    dmap = {
        "model.embed_tokens": 0,
        "model.layers.0": 0,
        "model.layers.1": 1,
        "model.norm": 1,
        "lm_head": "cuda:1",
    }
    p = Placement.from_device_map(dmap, input_module="model.embed_tokens", output_module="lm_head")
    cuda = lambda i: torch.device("cuda", i)  # noqa: E731
    assert (p.input, p.output, p.devices) == (cuda(0), cuda(1), (cuda(0), cuda(1)))
    # a parent entry covers its children; the longest match wins
    p = Placement.from_device_map(
        {"": "cpu", "lm_head": 2}, input_module="model.embed_tokens", output_module="lm_head"
    )
    assert (p.input, p.output) == (torch.device("cpu"), cuda(2))
    assert p.devices == (torch.device("cpu"), cuda(2))
    with pytest.raises(ConfigError):
        Placement.from_device_map({"model": 0}, input_module="model.embed", output_module="lm_head")
    with pytest.raises(ConfigError):
        Placement.from_device_map({"": "disk"}, input_module="x", output_module="y")
    with pytest.raises(ConfigError):
        Placement.from_device_map({}, input_module="x", output_module="y")


def test_placement_of_an_accelerate_dispatched_module(th):
    """A module carrying ``hf_device_map`` (what accelerate's dispatch leaves) is placed
    from the map, by the names of its embedding and LM head."""
    net = th.tiny_llama(0)
    net.hf_device_map = {
        "model.embed_tokens": 0,
        "model.layers": 1,
        "model.norm": 1,
        "model.rotary_emb": 1,
        "lm_head": 1,
    }
    p = Placement.of_module(net)
    assert p.input == torch.device("cuda", 0) and p.output == torch.device("cuda", 1)


def test_placement_of_a_module_left_where_it_is(th):
    net = th.tiny_llama(0)
    model = TorchModel.from_module(net, device=None)
    assert model.placement == Placement.single(torch.device("cpu"))
    assert model.device == torch.device("cpu")
    net.lm_head.to("meta")
    with pytest.raises(ConfigError):
        Placement.of_module(net)


def test_accelerate_dispatched_model_runs_through_the_pool(th, tmp_path):
    """accelerate's hooks (what a multi-GPU device_map installs) move every argument to
    each module's device; the pool's cache object and the 4-D mask survive them. On CPU
    every entry is "cpu", with ``force_hooks`` so the hooks are really there."""
    accelerate = pytest.importorskip("accelerate")
    net = th.tiny_llama(0)
    ref = TorchModel.from_module(net)
    dmap = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    twin = th.tiny_llama(0)
    twin = accelerate.dispatch_model(twin, device_map=dmap, main_device="cpu", force_hooks=True)
    assert hasattr(twin.model.layers[0], "_hf_hook")
    model = TorchModel.from_module(twin)
    assert model.placement == Placement.single(torch.device("cpu"))
    a, b = ref.open([1, 2, 3, 4]), model.open([1, 2, 3, 4])
    ka, kb = ref.fork(a, 2), model.fork(b, 2)
    out_ref = ref.extend([(a, [5, 6]), (ka, [7])])
    out = model.extend([(b, [5, 6]), (kb, [7])])
    assert torch.allclose(out, out_ref, atol=1e-5)
    # and from_pretrained(device_map=...) takes the same path
    net.save_pretrained(tmp_path)
    loaded = TorchModel.from_pretrained(str(tmp_path), device_map=dmap, load_tokenizer=False)
    h = loaded.open([1, 2, 3, 4])
    assert torch.allclose(loaded.extend([(h, [5, 6])]), out_ref[:2], atol=1e-5)


def test_a_download_then_numpy_is_one_sync():
    x = torch.arange(4.0)
    with count_host_syncs(simulate=True) as c:
        x.to("cpu").numpy()
        x.cpu().tolist()
    assert c.total == 2, c.by_kind
