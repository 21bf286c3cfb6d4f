"""The Hugging Face adapter across transformers versions: keyword names and cache layouts."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from backends.torch import TorchModel  # noqa: E402
from backends.torch._runners import HFRunner  # noqa: E402

PROMPT = [3, 17, 42, 5, 88, 1, 60]


class _Legacy4x(torch.nn.Module):
    """Looks like a transformers 4.x model: ``past_key_values=`` and ``num_logits_to_keep=``."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.seen: list[str] = []

    def can_generate(self) -> bool:
        return True

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=None,
        return_dict=None,
        num_logits_to_keep=0,
    ):
        self.seen.append("past_key_values")
        return self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=past_key_values,
            use_cache=use_cache,
            logits_to_keep=num_logits_to_keep,
        )


def test_legacy_keywords(th):
    legacy = _Legacy4x(th.tiny_llama(0))
    runner = HFRunner(legacy)
    assert runner._cache_kw == "past_key_values" and runner._keep_kw == "num_logits_to_keep"
    model = TorchModel.from_module(legacy)
    ref = TorchModel.from_module(th.tiny_llama(0))
    a, b = model.open(PROMPT), ref.open(PROMPT)
    assert torch.allclose(model.extend([(a, [1, 2])]), ref.extend([(b, [1, 2])]), atol=1e-5)
    assert legacy.seen


def test_current_keywords(th):
    runner = HFRunner(th.tiny_llama(0))
    import transformers

    major = int(transformers.__version__.split(".")[0])
    assert runner._cache_kw == ("cache" if major >= 5 else "past_key_values")
    assert runner._keep_kw is not None


def test_pool_cache_is_a_transformers_cache(th):
    """Models that check ``isinstance(cache, Cache)`` accept the pool's cache object, and
    its ``update`` stores keys/values in the pool and returns views of the arenas."""
    from transformers import Cache

    model = TorchModel.from_module(th.tiny_llama(0))
    h = model.open(PROMPT)
    model.extend([(h, [1])])
    cache_cls = model._runner._cache_cls
    assert issubclass(cache_cls, Cache)
    pool = model.pool
    assert sorted(pool.keys) == [0, 1]  # one arena per layer, allocated on first write
    k = pool.keys[0]
    assert k.shape == (2, pool.capacity, 8)  # [kv_heads, slots, head_dim]
    assert model.computed(h) == len(PROMPT) + 1


def test_attention_implementations_without_arbitrary_masks_are_refused(th):
    from ssd_core import ConfigError

    net = th.tiny_llama(0)
    net.config._attn_implementation = "eager"
    TorchModel.from_module(net)  # eager and sdpa take the pool's mask
    try:
        net.config._attn_implementation = "flash_attention_2"
    except (ValueError, ImportError):
        pytest.skip("this transformers refuses the setting without flash-attn installed")
    with pytest.raises(ConfigError, match="sdpa"):
        TorchModel.from_module(net)


def test_eager_attention_gets_an_additive_mask(th):
    net = th.tiny_llama(0)
    ref = TorchModel.from_module(th.tiny_llama(0))
    net.config._attn_implementation = "eager"
    model = TorchModel.from_module(net)
    assert not model._runner._bool_mask and ref._runner._bool_mask
    a, b = model.open(PROMPT), ref.open(PROMPT)
    ka, kb = model.fork(a, 3), ref.fork(b, 3)
    out = model.extend([(a, [1, 2]), (ka, [5])])
    assert torch.allclose(out, ref.extend([(b, [1, 2]), (kb, [5])]), atol=1e-5)


def test_grouped_query_attention_reads_the_pool_without_expanding_it(th):
    """With sdpa the backend switches the model to its pool-aware sdpa: same logits, and
    the keys/values of the span are not expanded per query head (no repeat_kv copy)."""
    from backends.torch import count_copies
    from backends.torch._runners import POOL_SDPA

    net, plain = th.tiny_llama(0), th.tiny_llama(0)
    model = TorchModel.from_module(net)
    assert net.config._attn_implementation == POOL_SDPA
    plain.config._attn_implementation = "eager"
    ref = TorchModel.from_module(plain)
    a, b = model.open(PROMPT * 4), ref.open(PROMPT * 4)
    model.extend([(a, [1])])
    ref.extend([(b, [1])])
    kids_a = [model.fork(a, 20 + i) for i in range(4)]
    kids_b = [ref.fork(b, 20 + i) for i in range(4)]
    with count_copies() as ours:
        out = model.extend([(k, [9]) for k in kids_a])
    with count_copies() as eager:
        want = ref.extend([(k, [9]) for k in kids_b])
    assert torch.allclose(out, want, atol=1e-5)
    assert ours.total < eager.total  # eager's repeat_kv expands the span's K/V
    # the model still works when called directly, with a padding mask
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with torch.inference_mode():
        got = net(input_ids=ids, attention_mask=mask).logits
        plain.config._attn_implementation = "sdpa"
        exp = plain(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got[:, -1], exp[:, -1], atol=1e-5)
