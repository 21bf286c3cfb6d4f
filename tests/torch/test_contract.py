"""The Model protocol on tiny random torch models (Hugging Face Llama and plain module)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from ssd_core import BackendContractError, CapacityError, ConfigError, HandleError, InputError  # noqa: E402

ATOL = 1e-4
PROMPT = [3, 17, 42, 5, 88, 1, 60]


def close(a, b, atol=ATOL) -> bool:
    return torch.allclose(a.float().cpu(), b.float().cpu(), atol=atol, rtol=1e-4)


@pytest.mark.parametrize("batching", ["pad", "loop"])
def test_extend_matches_fresh_prefill(kind, batching, th):
    model = th.make_model(kind, batching=batching)
    ref = th.full_logits(model, PROMPT + [9, 10, 11, 12])
    h = model.open(PROMPT)
    out = model.extend([(h, [9, 10])])
    assert out.dtype == torch.float32 and out.shape == (2, th.VOCAB)
    assert out.device == model.device
    assert close(out, ref[len(PROMPT) : len(PROMPT) + 2])
    for i, t in enumerate([11, 12]):
        row = model.extend([(h, [t])])
        assert close(row[0], ref[len(PROMPT) + 2 + i])
    assert model.tokens(h) == PROMPT + [9, 10, 11, 12]


def test_empty_open_then_extend(kind, th):
    model = th.make_model(kind)
    h = model.open([])
    out = model.extend([(h, PROMPT)])
    assert close(out, th.full_logits(model, PROMPT))


def test_fork_is_independent(kind, th):
    model = th.make_model(kind)
    h = model.open(PROMPT)
    model.extend([(h, [1, 2, 3])])
    child = model.fork(h, len(PROMPT) + 1)
    a = model.extend([(child, [50, 51])])
    b = model.extend([(h, [70])])
    assert close(a, th.full_logits(model, PROMPT + [1, 50, 51])[-2:])
    assert close(b[0], th.full_logits(model, PROMPT + [1, 2, 3, 70])[-1])
    # the parent's growth did not change the child, and vice versa
    c = model.extend([(child, [52])])
    assert close(c[0], th.full_logits(model, PROMPT + [1, 50, 51, 52])[-1])
    assert model.tokens(child) == PROMPT + [1, 50, 51, 52]
    # forking an uncomputed (lazy) handle works too
    lazy = model.open(PROMPT)
    twin = model.fork(lazy, 3)
    assert close(model.extend([(twin, [4])])[0], th.full_logits(model, PROMPT[:3] + [4])[-1])


def test_truncate_and_reextend(kind, th):
    model = th.make_model(kind)
    h = model.open(PROMPT)
    model.extend([(h, [1, 2, 3, 4])])
    model.truncate(h, len(PROMPT) + 1)
    out = model.extend([(h, [30, 31])])
    assert close(out, th.full_logits(model, PROMPT + [1, 30, 31])[-2:])
    model.truncate(h, 0)
    out = model.extend([(h, [7])])
    assert close(out[0], th.full_logits(model, [7])[0])
    model.truncate(h, 1)
    with pytest.raises(HandleError):
        model.truncate(h, 2)


@pytest.mark.parametrize("batching", ["pad", "loop", "auto"])
def test_batched_equals_separate(kind, batching, th):
    model = th.make_model(kind, batching=batching)
    prompts = [PROMPT, PROMPT[:2], [], PROMPT + [4, 4, 4]]
    news = [[1], [2, 3, 4], [5, 6], [7]]
    handles = [model.open(p) for p in prompts]
    # compute some prefixes first so the batch mixes computed and lazy parts
    model.extend([(handles[0], [8])])
    prompts[0] = prompts[0] + [8]
    out = model.extend(list(zip(handles, news, strict=False)))
    assert out.shape == (sum(map(len, news)), th.VOCAB)
    row = 0
    for p, n in zip(prompts, news, strict=False):
        ref = th.full_logits(model, p + n)[-len(n) :]
        assert close(out[row : row + len(n)], ref)
        row += len(n)
    # and the states left behind are right
    out2 = model.extend([(h, [9]) for h in handles])
    for i, (p, n) in enumerate(zip(prompts, news, strict=False)):
        assert close(out2[i], th.full_logits(model, p + n + [9])[-1])


def test_tree_step_of_forks(kind, th):
    """N branches forked at different depths, one token each: the tree-decode shape."""
    model = th.make_model(kind)
    root = model.open(PROMPT)
    model.extend([(root, [1, 2, 3, 4])])
    branches = [model.fork(root, len(PROMPT) + k) for k in range(5)]
    out = model.extend([(b, [20 + i]) for i, b in enumerate(branches)])
    for i in range(5):
        ctx = (PROMPT + [1, 2, 3, 4])[: len(PROMPT) + i] + [20 + i]
        assert close(out[i], th.full_logits(model, ctx)[-1])


def test_close_and_handle_errors(kind, th):
    model = th.make_model(kind)
    h = model.open(PROMPT)
    assert model.open_handles == 1
    model.close(h)
    assert model.open_handles == 0
    with pytest.raises(HandleError):
        model.extend([(h, [1])])
    with pytest.raises(HandleError):
        model.fork(h, 0)
    with pytest.raises(HandleError):
        model.close(h)
    g = model.open([1])
    with pytest.raises(HandleError):
        model.fork(g, 2)


def test_input_validation_before_compute(kind, th):
    model = th.make_model(kind)
    h = model.open(PROMPT)
    g = model.open([1])
    with pytest.raises(InputError):
        model.extend([(h, [th.VOCAB])])
    with pytest.raises(InputError):
        model.extend([(h, [-1])])
    with pytest.raises(InputError):
        model.extend([(h, [])])
    with pytest.raises(InputError):
        model.extend([(h, [1]), (h, [2])])
    with pytest.raises(InputError):
        model.open([0, th.VOCAB + 5])
    # a bad request anywhere in the batch leaves every handle untouched
    with pytest.raises(InputError):
        model.extend([(g, [2]), (h, [th.VOCAB])])
    assert model.tokens(g) == [1] and model.tokens(h) == PROMPT
    assert model.extend([]).shape == (0, th.VOCAB)


def test_capacity(kind, th):
    model = th.make_model(kind, context_size=10)
    assert model.context_size == 10
    with pytest.raises(CapacityError):
        model.open(list(range(11)))
    h = model.open(list(range(8)))
    with pytest.raises(CapacityError):
        model.extend([(h, [1, 2, 3])])
    assert model.extend([(h, [1, 2])]).shape == (2, th.VOCAB)
    with pytest.raises(CapacityError):
        model.extend([(h, [1])])


def test_context_size_defaults_from_config(kind, th):
    model = th.make_model(kind)
    assert model.context_size == 128


class _NaNModule(torch.nn.Module):
    vocab_size = 8

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, pos, past, mask):
        b, t = ids.shape
        logits = torch.zeros(b, t, 8)
        logits[..., 3] = self.value
        kv = torch.zeros(b, 1, t, 2)
        if past is not None:
            kv = torch.cat([past[0][0], kv], dim=-2)
        return logits, ((kv, kv),)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_raise(value):
    from backends.torch import TorchModel

    model = TorchModel.from_module(_NaNModule(value), check_finite=True)
    h = model.open([1])
    with pytest.raises(BackendContractError):
        model.extend([(h, [2])])
    assert model.tokens(h) == [1]


def test_non_finite_logits_are_caught_by_the_core_by_default():
    from backends.torch import TorchModel
    from ssd_core import GenerationError, generate

    model = TorchModel.from_module(_NaNModule(float("nan")))
    with pytest.raises(GenerationError) as info:
        generate(model, None, prompts=[[1]], mode="ar", max_new_tokens=2)
    assert isinstance(info.value.__cause__, BackendContractError)


def test_neg_inf_logits_allowed():
    from backends.torch import TorchModel

    model = TorchModel.from_module(_NaNModule(float("-inf")))
    h = model.open([1])
    assert torch.isneginf(model.extend([(h, [2])])[0, 3])


def test_wrong_shape_raises():
    from backends.torch import TorchModel

    model = TorchModel.from_module(_NaNModule(0.0), vocab_size=9)
    h = model.open([1])
    with pytest.raises(BackendContractError):
        model.extend([(h, [2])])


def test_bad_options():
    from backends.torch import TinyTransformer, TorchModel

    with pytest.raises(ConfigError):
        TorchModel.from_module(TinyTransformer(), batching="sometimes")
    with pytest.raises(ConfigError):
        TorchModel.from_module(TinyTransformer(), dtype="int8")
    with pytest.raises(ConfigError):
        TorchModel.from_module(TinyTransformer(), dtype="float7")
    with pytest.raises(ConfigError):
        TorchModel.from_module(TinyTransformer(), device="cuda:99")
    with pytest.raises(ConfigError):
        TorchModel.from_module(torch.nn.Linear(2, 2))
