"""The Model protocol on OrtModel: KV correctness, fork/truncate, batching, errors."""

from __future__ import annotations

import numpy as np
import pytest

from ssd_core import BackendContractError, CapacityError, HandleError, InputError, Model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("torch")  # the fixtures are exported from torch


TOL = 1e-4
PROMPT = [3, 17, 42, 8, 5, 77, 1]


@pytest.fixture(params=["target", "target_nocache"])
def graph(request, onnx_files) -> str:
    return onnx_files[request.param]


@pytest.fixture(
    params=[
        {"io_binding": False},
        {"io_binding": True, "kv_on_device": False},
        {"io_binding": True, "kv_on_device": True},
    ],
    ids=["run", "iobinding-host", "iobinding-torch"],
)
def io_binding(request) -> dict:
    """session.run with numpy; one IOBinding over numpy buffers; over torch buffers."""
    return request.param


def test_attributes(onnx_files, oh):
    m = oh.load(onnx_files["target"])
    assert isinstance(m, Model)
    assert (m.name, m.vocab_size, m.context_size, m.tokenizer) == (
        "target",
        oh.VOCAB,
        oh.CONTEXT,
        None,
    )
    assert m.provider == "CPUExecutionProvider" and not m.providers.fell_back
    assert m.signature.has_cache and m.signature.num_layers == 2
    assert not oh.load(onnx_files["target_nocache"]).signature.has_cache


def test_extend_in_pieces_equals_fresh_prefill(graph, io_binding, oh):
    m = oh.load(graph, **io_binding)
    ref = oh.fresh_logits(m, PROMPT)
    assert tuple(ref.shape) == (len(PROMPT), oh.VOCAB) and str(ref.dtype).endswith("float32")
    h = m.open(PROMPT[:3])  # lazy: nothing computed yet
    assert m.cached_length(h) == 0
    rows = [m.extend([(h, PROMPT[3:5])]), m.extend([(h, PROMPT[5:6])]), m.extend([(h, PROMPT[6:])])]
    got = np.concatenate(rows)
    np.testing.assert_allclose(got, ref[3:], atol=TOL, rtol=0)
    assert m.tokens(h) == PROMPT
    if m.signature.has_cache:
        assert m.cached_length(h) == len(PROMPT)


def test_matches_torch_module_on_same_weights(onnx_files, torch_target, oh):
    m = oh.load(onnx_files["target"])
    want = oh.torch_logits(torch_target, PROMPT)
    got = oh.fresh_logits(m, PROMPT)
    diff = float(np.abs(got - want).max())
    assert diff < TOL, diff
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_cache_and_recompute_graphs_agree(onnx_files, oh):
    a = oh.fresh_logits(oh.load(onnx_files["target"]), PROMPT)
    b = oh.fresh_logits(oh.load(onnx_files["target_nocache"]), PROMPT)
    np.testing.assert_allclose(a, b, atol=TOL, rtol=0)


def test_fork_is_independent(graph, oh):
    m = oh.load(graph)
    parent = m.open(PROMPT[:4])
    m.extend([(parent, PROMPT[4:6])])
    child = m.fork(parent, 5)
    sibling = m.fork(parent, 2)  # shorter than what is cached
    lazy = m.fork(child, 5)
    c = m.extend([(child, [9, 9, 9])])
    s = m.extend([(sibling, [11])])
    p = m.extend([(parent, PROMPT[6:])])
    z = m.extend([(lazy, [9])])
    assert m.tokens(parent) == PROMPT and m.tokens(child) == PROMPT[:5] + [9, 9, 9]
    np.testing.assert_allclose(p, oh.fresh_logits(m, PROMPT)[6:], atol=TOL, rtol=0)
    np.testing.assert_allclose(c, oh.fresh_logits(m, PROMPT[:5] + [9, 9, 9])[5:], atol=TOL, rtol=0)
    np.testing.assert_allclose(s, oh.fresh_logits(m, PROMPT[:2] + [11])[2:], atol=TOL, rtol=0)
    np.testing.assert_allclose(z, c[:1], atol=TOL, rtol=0)


def test_fork_of_uncached_prefix(graph, oh):
    m = oh.load(graph)
    h = m.open(PROMPT)
    child = m.fork(h, 4)
    np.testing.assert_allclose(
        m.extend([(child, [2])]), oh.fresh_logits(m, PROMPT[:4] + [2])[4:], atol=TOL, rtol=0
    )


def test_truncate_then_reextend_equals_fresh(graph, oh):
    m = oh.load(graph)
    h = m.open(PROMPT[:2])
    m.extend([(h, PROMPT[2:])])
    m.truncate(h, 3)
    assert m.tokens(h) == PROMPT[:3]
    got = m.extend([(h, [60, 61])])
    np.testing.assert_allclose(got, oh.fresh_logits(m, PROMPT[:3] + [60, 61])[3:], atol=TOL, rtol=0)
    m.truncate(h, 0)
    np.testing.assert_allclose(m.extend([(h, [4])]), oh.fresh_logits(m, [4]), atol=TOL, rtol=0)
    m.truncate(h, 1)  # no-op at the end
    assert m.tokens(h) == [4]


@pytest.mark.parametrize("batching", ["padded", "sequential"])
def test_batched_equals_separate(graph, batching, io_binding, oh):
    m = oh.load(graph, batching=batching, **io_binding)
    assert m.batching == batching
    prompts = [PROMPT, [5], [], PROMPT[:3]]
    news = [[1, 2], [3], [4, 5, 6], [7]]
    handles = [m.open(p) for p in prompts]
    m.extend([(handles[0], [9])])  # different cached lengths, some tokens uncached
    prompts[0] = PROMPT + [9]
    got = m.extend(list(zip(handles, news, strict=True)))
    want = np.concatenate(
        [oh.fresh_logits(m, p + n)[len(p) :] for p, n in zip(prompts, news, strict=True)]
    )
    assert got.shape == (sum(map(len, news)), oh.VOCAB)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # the state after a batched call is as good as after separate ones
    again = m.extend([(h, [8]) for h in handles])
    want = np.concatenate(
        [oh.fresh_logits(m, p + n + [8])[-1:] for p, n in zip(prompts, news, strict=True)]
    )
    np.testing.assert_allclose(again, want, atol=TOL, rtol=0)


def test_random_walk_matches_recomputation(onnx_files, oh):
    rng = np.random.default_rng(0)
    m = oh.load(onnx_files["target"], batching="padded")
    live: dict[int, list[int]] = {}
    for _ in range(60):
        op = rng.choice(
            ["open", "extend", "fork", "truncate", "close"], p=[0.15, 0.4, 0.2, 0.15, 0.1]
        )
        if op == "open" or not live:
            toks = rng.integers(0, oh.VOCAB, rng.integers(0, 4)).tolist()
            live[m.open(toks)] = toks
        elif op == "extend":
            hs = rng.choice(
                list(live), size=min(len(live), rng.integers(1, 4)), replace=False
            ).tolist()
            reqs = [(h, rng.integers(0, oh.VOCAB, rng.integers(1, 4)).tolist()) for h in hs]
            reqs = [(h, t) for h, t in reqs if len(live[h]) + len(t) <= oh.CONTEXT]
            if not reqs:
                continue
            got = m.extend(reqs)
            want = np.concatenate(
                [oh.fresh_logits(m, live[h] + t)[len(live[h]) :] for h, t in reqs]
            )
            np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
            for h, t in reqs:
                live[h] = live[h] + t
        elif op == "fork":
            h = int(rng.choice(list(live)))
            n = int(rng.integers(0, len(live[h]) + 1))
            live[m.fork(h, n)] = live[h][:n]
        elif op == "truncate":
            h = int(rng.choice(list(live)))
            n = int(rng.integers(0, len(live[h]) + 1))
            m.truncate(h, n)
            live[h] = live[h][:n]
        else:
            h = int(rng.choice(list(live)))
            m.close(h)
            del live[h]
        assert all(m.tokens(h) == t for h, t in live.items())
    assert m.open_handles == len(live)


def test_close_and_handle_errors(onnx_files, oh):
    m = oh.load(onnx_files["target"])
    h = m.open([1, 2])
    m.close(h)
    assert m.open_handles == 0
    for call in (
        lambda: m.extend([(h, [1])]),
        lambda: m.fork(h, 0),
        lambda: m.truncate(h, 0),
        lambda: m.close(h),
        lambda: m.extend([("nope", [1])]),
    ):
        with pytest.raises(HandleError):
            call()
    g = m.open([1, 2])
    with pytest.raises(HandleError):
        m.fork(g, 3)
    with pytest.raises(HandleError):
        m.truncate(g, -1)


def test_input_errors_change_nothing(onnx_files, oh):
    m = oh.load(onnx_files["target"])
    h = m.open([1])
    with pytest.raises(InputError):
        m.open([oh.VOCAB])
    with pytest.raises(InputError):
        m.extend([(h, [-1])])
    with pytest.raises(InputError):
        m.extend([(h, [])])
    with pytest.raises(InputError):
        m.extend([(h, [1]), (h, [2])])
    assert m.tokens(h) == [1] and m.open_handles == 1
    assert m.extend([]).shape == (0, oh.VOCAB)


def test_capacity(onnx_files, oh):
    m = oh.load(onnx_files["target"], context_size=5, max_handles=2)
    assert m.context_size == 5
    with pytest.raises(CapacityError):
        m.open(list(range(6)))
    h = m.open([1, 2, 3])
    with pytest.raises(CapacityError):
        m.extend([(h, [4, 5, 6])])
    assert m.extend([(h, [4, 5])]).shape == (2, oh.VOCAB)
    m.fork(h, 2)
    with pytest.raises(CapacityError):
        m.open([])
    with pytest.raises(CapacityError):
        m.fork(h, 1)


def test_context_size_defaults_to_graph_metadata(onnx_files, oh):
    assert oh.load(onnx_files["target"]).context_size == oh.CONTEXT
    h = (m := oh.load(onnx_files["target"])).open(list(range(oh.CONTEXT - 1)))
    m.extend([(h, [0])])
    with pytest.raises(CapacityError):
        m.extend([(h, [0])])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_logits_are_a_contract_error(onnx_files, oh, bad):
    m = oh.load(onnx_files["target"])
    h = m.open([1, 2])
    real = m._run

    def poisoned(feeds, names):
        out = real(feeds, names)
        logits = out[0].copy()
        logits[..., 3] = bad
        return [logits, *out[1:]]

    m._run = poisoned
    with pytest.raises(BackendContractError, match="NaN"):
        m.extend([(h, [3])])
    assert m.tokens(h) == [1, 2] and m.cached_length(h) == 0  # nothing committed
    m._run = real
    assert np.isfinite(m.extend([(h, [3])])).all()


def test_neg_inf_logits_are_allowed(onnx_files, oh):
    m = oh.load(onnx_files["target"])
    real = m._run
    m._run = lambda feeds, names: [
        o if i else np.where(np.arange(o.shape[-1]) == 0, -np.inf, o)
        for i, o in enumerate(real(feeds, names))
    ]
    out = m.extend([(m.open([]), [1])])
    assert out[0, 0] == -np.inf


def test_wrong_logits_shape_is_a_contract_error(onnx_files, oh):
    m = oh.load(onnx_files["target"])
    real = m._run
    m._run = lambda feeds, names: [
        o[..., :-1] if i == 0 else o for i, o in enumerate(real(feeds, names))
    ]
    with pytest.raises(BackendContractError, match="shape"):
        m.extend([(m.open([]), [1])])


def test_runs_release_no_state_between_models(onnx_files, oh):
    # two models on the same file are independent (separate sessions, separate tables)
    a, b = oh.load(onnx_files["target"]), oh.load(onnx_files["target"])
    ha, hb = a.open([1]), b.open([1])
    np.testing.assert_array_equal(a.extend([(ha, [2])]), b.extend([(hb, [2])]))


class _NoPositions:
    """A session proxy that hides the position_ids input (and drops it from the feeds)."""

    def __init__(self, real):
        self._real = real

    def get_inputs(self):
        return [i for i in self._real.get_inputs() if i.name != "position_ids"]

    def run(self, names, feeds):
        raise AssertionError("not run in this test")

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_padding_needs_positions_for_cached_graphs(onnx_files, oh):
    from backends.onnxruntime import OrtModel

    real = oh.load(onnx_files["target"])._session
    m = OrtModel(_NoPositions(real), name="nopos", batching="padded")
    assert m.batching == "sequential" and not m.signature.has_positions
