"""The KV pool: blocks shared by reference, copy-on-write, O(1) truncation, no prefix
copies in tree steps, rollback on failure, growth, chunked passes, the legacy path."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from backends.torch import KVPool, TinyTransformer, TorchModel  # noqa: E402
from backends.torch._pool import tree_mask  # noqa: E402
from ssd_core import BackendContractError  # noqa: E402

PROMPT = list(range(3, 40))  # 37 tokens: two full blocks of 16 and a partial one


def close(a, b, atol=1e-4) -> bool:
    return torch.allclose(a.float(), b.float(), atol=atol, rtol=1e-4)


# -- bookkeeping, no model ---------------------------------------------------------------


def test_plan_commit_fork_truncate_refcounts():
    pool = KVPool(block_size=4, initial_tokens=16)
    plan = pool.plan([([], 0, 10)])
    assert plan.slots == [list(range(10))] and plan.tables == [[0, 1, 2]]
    pool.commit(plan)
    parent = plan.tables[0]
    child = pool.fork_table(parent, 6)  # positions 0..5: blocks 0 and 1, no copy
    assert child == [0, 1] and [pool.refcount(b) for b in range(3)] == [2, 2, 1]
    # the child writes position 6 inside block 1, which the parent fills up to 8: copy
    plan = pool.plan([(child, 6, 1)])
    assert plan.cow == [(1, 3, 2)] and plan.tables == [[0, 3]] and plan.slots == [[14]]
    pool.commit(plan)
    child = plan.tables[0]
    assert [pool.refcount(b) for b in range(4)] == [2, 1, 1, 1]
    # the parent writes its frontier (position 10) in place
    plan = pool.plan([(parent, 10, 1)])
    assert not plan.cow and plan.slots == [[10]]
    pool.commit(plan)
    # truncation drops whole blocks only
    pool.truncate_table(parent, 5)
    assert parent == [0, 1] and pool.refcount(2) == 0
    pool.release(child)
    pool.release(parent)
    assert pool.blocks_in_use == 0


def test_frontier_is_claimed_once():
    """Two forks at the same length share a partial block: the first to write claims the
    frontier in place, the second (same call) copies; neither sees the other's token."""
    pool = KVPool(block_size=4, initial_tokens=16)
    plan = pool.plan([([], 0, 6)])
    pool.commit(plan)
    a = pool.fork_table(plan.tables[0], 6)
    b = pool.fork_table(plan.tables[0], 6)
    pool.release(plan.tables[0])
    plan = pool.plan([(a, 6, 1), (b, 6, 1)])
    assert plan.slots[0] == [6]  # in place: nobody held position 6
    assert plan.cow == [(1, 2, 2)] and plan.slots[1] == [10]
    pool.abort(plan)  # a failed call frees what it took
    assert pool.blocks_in_use == 2 and pool.refcount(1) == 2


def test_growth_keeps_contents():
    pool = KVPool(block_size=2, initial_tokens=2)
    plan = pool.plan([([], 0, 2)])
    pool.commit(plan)
    pool.write(0, torch.ones(1, 2, 3), torch.ones(1, 2, 3) * 2, torch.tensor([0, 1]))
    plan = pool.plan([(plan.tables[0], 2, 5)])  # needs 3 more blocks: grows twice
    pool.commit(plan)
    assert pool.capacity == 8
    assert pool.stats.kv_grow_bytes > 0
    k, v = pool.view(0, 2)
    assert (k == 1).all() and (v == 2).all()


def test_tree_mask_sees_prefix_and_own_tokens_only():
    bs = 2
    # row 0 holds positions 0..4 in blocks [0, 1, 2]; row 1 forked at 3: blocks [0, 3]
    tables = torch.tensor([[0, 1, 2], [0, 3, -1]])
    rows = torch.tensor([0, 1])
    positions = torch.tensor([4, 3])
    mask = tree_mask(tables, rows, positions, span_blocks=4, block_size=bs)
    assert mask.shape == (2, 8)
    assert mask[0].tolist() == [True] * 5 + [False] * 3
    # row 1: block 0 (positions 0, 1), block 3 (positions 2, 3); not blocks 1, 2
    assert mask[1].tolist() == [True, True, False, False, False, False, True, True]


# -- through the model -------------------------------------------------------------------


@pytest.fixture(params=["llama", "plain"])
def model(request, th) -> TorchModel:
    return th.make_model(request.param, block_size=16, kv_tokens=512)


def test_tree_step_copies_no_prefix(model, th):
    root = model.open(PROMPT)
    model.extend([(root, [1])])
    written = model.stats.kv_written_bytes
    per_token = written // (len(PROMPT) + 1)
    branches = [model.fork(root, len(PROMPT) + 1) for _ in range(8)]
    model.stats.reset()
    for step in range(3):
        out = model.extend([(b, [10 + i + step]) for i, b in enumerate(branches)])
        for i in range(len(branches)):
            ctx = PROMPT + [1] + [10 + i + s for s in range(step + 1)]
            assert close(out[i], th.full_logits(model, ctx)[-1])
    st = model.stats
    assert st.kv_written_bytes == 3 * 8 * per_token  # only the new tokens are written
    assert st.kv_gather_bytes == 0 and st.kv_grow_bytes == 0
    # each branch copied the shared part of one block once (6 of 16 slots), nothing else
    assert st.kv_cow_bytes == 7 * 6 * per_token  # the first branch claims the frontier
    for b in branches:
        model.close(b)
    model.close(root)
    assert model.pool.blocks_in_use == 0


def test_truncate_is_bookkeeping_only(model, th):
    h = model.open(PROMPT)
    model.extend([(h, [1, 2, 3, 4])])
    model.stats.reset()
    model.truncate(h, 20)
    assert model.computed(h) == 20 and model.stats.as_dict()["kv_copied_bytes"] == 0
    out = model.extend([(h, [5])])
    assert close(out[0], th.full_logits(model, PROMPT[:20] + [5])[-1])


def test_failed_call_leaves_handles_and_pool_unchanged(th):
    net = TinyTransformer(vocab_size=th.VOCAB, seed=0, max_positions=128)
    model = TorchModel.from_module(net, block_size=4)
    h = model.open(PROMPT[:10])
    model.extend([(h, [1])])
    g = model.fork(h, 6)
    before = (model.pool.blocks_in_use, model.computed(h), model.computed(g))
    calls = []

    def boom(*a, **k):
        calls.append(1)
        raise RuntimeError("device fell over")

    real = net.forward
    net.forward = boom
    with pytest.raises(RuntimeError):
        model.extend([(h, [2, 3, 4, 5, 6]), (g, [7])])
    net.forward = real
    assert calls and (model.pool.blocks_in_use, model.computed(h), model.computed(g)) == before
    assert model.tokens(h) == PROMPT[:10] + [1]
    out = model.extend([(h, [2]), (g, [7])])
    assert close(out[0], th.full_logits(model, PROMPT[:10] + [1, 2])[-1])
    assert close(out[1], th.full_logits(model, PROMPT[:6] + [7])[-1])


@pytest.mark.parametrize("limit", [1, 5, 512])
def test_chunked_passes_match(th, limit):
    model = th.make_model("llama", max_tokens_per_pass=limit)
    a, b = model.open(PROMPT), model.open(PROMPT[:5])
    out = model.extend([(a, [1, 2, 3]), (b, [4])])
    assert out.shape == (4, th.VOCAB)
    assert close(out[:3], th.full_logits(model, PROMPT + [1, 2, 3])[-3:])
    assert close(out[3], th.full_logits(model, PROMPT[:5] + [4])[-1])
    expected = 1 if limit >= len(PROMPT) + 8 else -(-(len(PROMPT) + 3 + 5 + 1) // limit)
    assert model.stats.forwards == expected


def test_prefill_keeps_only_the_rows_asked_for(th):
    """A lazily prefilled prompt of 37 tokens and 2 new ones: the LM head sees 2 rows."""
    net = th.tiny_llama(0)
    seen = []
    net.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    model = TorchModel.from_module(net)
    h = model.open(PROMPT)
    model.extend([(h, [1, 2])])
    assert seen == [(1, 2, th.VOCAB)]


def test_legacy_plain_signature_gathers(th):
    """A plain module with the dense signature still works, through a gather (counted)."""
    net = TinyTransformer(vocab_size=th.VOCAB, seed=0, max_positions=128)
    net.kv_pool = False  # instance attribute: take the legacy path
    legacy = TorchModel.from_module(net)
    pooled = th.make_model("plain")
    for m in (legacy, pooled):
        h = m.open(PROMPT)
        m.extend([(h, [1])])
        kids = [m.fork(h, 20 + i) for i in range(3)]
        m._out = m.extend([(k, [5 + i]) for i, k in enumerate(kids)])
    assert close(legacy._out, pooled._out)
    assert legacy.stats.kv_gather_bytes > 0 and pooled.stats.kv_gather_bytes == 0


def test_logits_follow_the_request_order_across_passes(th):
    model = th.make_model("plain", max_tokens_per_pass=3, batching="loop")
    hs = [model.open(PROMPT[: 4 + i]) for i in range(3)]
    out = model.extend([(h, [1, 2]) for h in hs])
    for i in range(3):
        assert close(out[2 * i : 2 * i + 2], th.full_logits(model, PROMPT[: 4 + i] + [1, 2])[-2:])


def test_wrong_vocab_from_a_pooled_module_raises(th):
    net = TinyTransformer(vocab_size=th.VOCAB, seed=0, max_positions=128)
    model = TorchModel.from_module(net, vocab_size=th.VOCAB + 1)
    h = model.open([1])
    with pytest.raises(BackendContractError):
        model.extend([(h, [2])])
    assert model.computed(h) == 0 and model.pool.blocks_in_use == 0
