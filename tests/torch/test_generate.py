"""The core engine on tiny torch models: greedy identity AR == SD == SSD, and sampling runs."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from ssd_core import SamplingParams, SSDConfig, generate  # noqa: E402

PROMPTS = [[3, 17, 42, 5, 88], [9], [60, 61, 62, 63, 1, 2, 3, 4, 5]]


def _noisy_copy(net, scale: float, seed: int):
    """A draft: the target's weights plus Gaussian noise (high, imperfect acceptance)."""
    draft = copy.deepcopy(net)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp_min(1e-3))
    return draft


def _pair(th, kind: str, **kw):
    from backends.torch import TinyTransformer, TorchModel

    net = (
        th.tiny_llama(0)
        if kind == "llama"
        else TinyTransformer(vocab_size=th.VOCAB, seed=0, max_positions=128)
    )
    target = TorchModel.from_module(net, **kw)
    draft = TorchModel.from_module(_noisy_copy(net, 0.3, seed=1), **kw)
    return target, draft


@pytest.mark.parametrize("batching", ["auto", "loop"])
def test_greedy_identity(kind, batching, th):
    target, draft = _pair(th, kind, batching=batching)
    greedy = SamplingParams(temperature=0.0)
    runs = {}
    for mode, driver in [
        ("ar", "sequential"),
        ("sd", "sequential"),
        ("ssd", "sequential"),
        ("ssd", "threaded"),
    ]:
        res = generate(
            target,
            draft,
            prompts=PROMPTS,
            mode=mode,
            max_new_tokens=24,
            sampling=greedy,
            config=SSDConfig(k=4),
            driver=driver,
            seed=0,
        )
        runs[(mode, driver)] = res
        assert target.open_handles == 0 and draft.open_handles == 0
    ar = runs[("ar", "sequential")].tokens
    assert all(len(t) == 24 for t in ar)
    for key, res in runs.items():
        assert res.tokens == ar, key
    # the draft is close to the target, so speculation is accepted some of the time
    assert runs[("sd", "sequential")].metrics is not None


def test_greedy_identity_mixed_pair(th):
    """A Hugging Face target with a plain-module draft (same vocabulary)."""
    from backends.torch import TinyTransformer, TorchModel

    target = TorchModel.from_module(th.tiny_llama(0))
    draft = TorchModel.from_module(TinyTransformer(vocab_size=th.VOCAB, seed=5, max_positions=128))
    greedy = SamplingParams(temperature=0.0)
    ar = generate(target, draft, prompts=PROMPTS, mode="ar", max_new_tokens=16, sampling=greedy)
    for mode in ("sd", "ssd"):
        res = generate(
            target,
            draft,
            prompts=PROMPTS,
            mode=mode,
            max_new_tokens=16,
            sampling=greedy,
            config=SSDConfig(k=3),
            seed=0,
        )
        assert res.tokens == ar.tokens, mode


def test_sampling_runs_and_is_reproducible(th):
    target, draft = _pair(th, "llama")
    params = SamplingParams(temperature=1.0)
    a = generate(
        target,
        draft,
        prompts=PROMPTS,
        mode="ssd",
        max_new_tokens=16,
        sampling=params,
        config=SSDConfig(k=3, fallback="neural"),
        seed=7,
    )
    b = generate(
        target,
        draft,
        prompts=PROMPTS,
        mode="ssd",
        max_new_tokens=16,
        sampling=params,
        config=SSDConfig(k=3, fallback="neural"),
        seed=7,
    )
    assert a.tokens == b.tokens
    assert all(0 <= t < th.VOCAB for row in a.tokens for t in row)
