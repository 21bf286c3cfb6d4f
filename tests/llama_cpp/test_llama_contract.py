"""Model-protocol contract of the llama.cpp backend on a tiny random GGUF (fast tier)."""

from __future__ import annotations

import numpy as np
import pytest

from backends.llama_cpp import LlamaCppModel, from_gguf
from ssd_core import CapacityError, HandleError, InputError, Model

PROMPT = [1, 17, 300, 301, 302, 45, 99, 7, 250, 310]


def one_by_one(model: LlamaCppModel, tokens: list[int]) -> np.ndarray:
    """Logits after every token of ``tokens``, decoding one token per call."""
    h = model.open([])
    rows = [model.extend([(h, [t])])[0] for t in tokens]
    model.close(h)
    return np.stack(rows)


def test_is_a_model(tiny: LlamaCppModel) -> None:
    assert isinstance(tiny, Model)
    assert tiny.vocab_size == 324
    assert tiny.context_size == 256


def test_empty_open_then_extend_scores_every_token(tiny: LlamaCppModel) -> None:
    h = tiny.open([])
    assert tiny.kv_length(h) == 0
    rows = tiny.extend([(h, PROMPT)])
    assert rows.shape == (len(PROMPT), tiny.vocab_size)
    assert np.isfinite(rows).all()
    assert tiny.kv_length(h) == len(PROMPT)


def test_extend_equals_fresh_prefill(tiny: LlamaCppModel) -> None:
    a = tiny.open(PROMPT[:6])
    rows_a = tiny.extend([(a, PROMPT[6:])])
    b = tiny.open([])
    rows_b = tiny.extend([(b, PROMPT)])
    np.testing.assert_array_equal(rows_a, rows_b[6:])


def test_batch_invariant_rows_equal_one_token_decodes(tiny: LlamaCppModel) -> None:
    tokens = [int(t) for t in np.random.default_rng(1).integers(5, 324, size=150)]
    h = tiny.open([])
    many = tiny.extend([(h, tokens)])  # 150 tokens: split into chunks of <= 63
    np.testing.assert_array_equal(many, one_by_one(tiny, tokens))


def test_batched_equals_separate(tiny: LlamaCppModel) -> None:
    prompts = [PROMPT[:3], PROMPT[:5], PROMPT, [1, 2]]
    news = [[40, 41], [42], [43, 44, 45], [46, 47, 48, 49]]
    hs = [tiny.open(p) for p in prompts]
    together = tiny.extend(list(zip(hs, news, strict=True)))
    separate = []
    for p, n in zip(prompts, news, strict=True):
        h = tiny.open(p)
        separate.append(tiny.extend([(h, n)]))
    np.testing.assert_array_equal(together, np.concatenate(separate))


def test_fork_is_independent(tiny: LlamaCppModel) -> None:
    parent = tiny.open(PROMPT)
    child = tiny.fork(parent, 4)
    assert tiny.tokens(child) == PROMPT[:4]
    child_rows = tiny.extend([(child, [200, 201])])
    parent_rows = tiny.extend([(parent, [202])])
    fresh = one_by_one(tiny, PROMPT + [202])
    np.testing.assert_array_equal(parent_rows[0], fresh[-1])
    fresh_child = one_by_one(tiny, PROMPT[:4] + [200, 201])
    np.testing.assert_array_equal(child_rows, fresh_child[-2:])
    tiny.truncate(parent, 2)  # changing the parent leaves the child alone
    again = tiny.extend([(child, [203])])
    np.testing.assert_array_equal(again[0], one_by_one(tiny, PROMPT[:4] + [200, 201, 203])[-1])


def test_fork_of_empty_and_full_length(tiny: LlamaCppModel) -> None:
    parent = tiny.open(PROMPT)
    empty = tiny.fork(parent, 0)
    full = tiny.fork(parent, len(PROMPT))
    rows = tiny.extend([(empty, PROMPT), (full, [9])])
    expected = one_by_one(tiny, PROMPT + [9])
    np.testing.assert_array_equal(rows[: len(PROMPT)], expected[:-1])
    np.testing.assert_array_equal(rows[-1], expected[-1])


def test_truncate_then_extend_equals_fresh(tiny: LlamaCppModel) -> None:
    h = tiny.open(PROMPT)
    tiny.extend([(h, [11, 12, 13])])
    tiny.truncate(h, 5)
    assert tiny.kv_length(h) == 5
    rows = tiny.extend([(h, [14, 15])])
    np.testing.assert_array_equal(rows, one_by_one(tiny, PROMPT[:5] + [14, 15])[-2:])


def test_history_does_not_change_logits(tiny: LlamaCppModel) -> None:
    # Churn the KV cache (forks, truncations, closes leave holes), then compare.
    rng = np.random.default_rng(3)
    live = [tiny.open(PROMPT)]
    for _ in range(40):
        h = live[int(rng.integers(len(live)))]
        op = rng.integers(4)
        n = len(tiny.tokens(h))
        if op == 0 and len(live) < 12:
            live.append(tiny.fork(h, int(rng.integers(n + 1))))
        elif op == 1:
            tiny.truncate(h, int(rng.integers(n + 1)))
        elif op == 2 and len(live) > 1:
            tiny.close(h)
            live.remove(h)
        else:
            tiny.extend([(h, [int(t) for t in rng.integers(5, 324, size=int(rng.integers(1, 9)))])])
    for h in live:
        toks = tiny.tokens(h)
        if not toks:
            continue
        got = tiny.extend([(h, [77])])[0]
        np.testing.assert_array_equal(got, one_by_one(tiny, toks + [77])[-1])


def test_close_releases_and_reuses_sequences(tiny: LlamaCppModel) -> None:
    hs = [tiny.open(PROMPT) for _ in range(16)]
    with pytest.raises(CapacityError):
        tiny.open([1])
    with pytest.raises(CapacityError):
        tiny.fork(hs[0], 2)
    for h in hs:
        tiny.close(h)
    assert tiny.open_handles == 0
    h = tiny.open([])
    assert h not in hs  # handles are never reused, sequence ids are
    assert tiny.kv_length(h) == 0
    with pytest.raises(HandleError):
        tiny.extend([(hs[0], [1])])
    with pytest.raises(HandleError):
        tiny.close(hs[0])


def test_input_validation(tiny: LlamaCppModel) -> None:
    h = tiny.open([1, 2])
    with pytest.raises(InputError):
        tiny.open([324])
    with pytest.raises(InputError):
        tiny.extend([(h, [-1])])
    with pytest.raises(InputError):
        tiny.extend([(h, [])])
    with pytest.raises(InputError):
        tiny.extend([(h, [3]), (h, [4])])
    with pytest.raises(HandleError):
        tiny.extend([(12345, [3])])
    with pytest.raises(HandleError):
        tiny.fork(h, 3)
    with pytest.raises(HandleError):
        tiny.truncate(h, 3)
    assert tiny.tokens(h) == [1, 2]  # nothing was appended by the failed calls


def test_capacity_error_at_context_size(tiny: LlamaCppModel) -> None:
    with pytest.raises(CapacityError):
        tiny.open([5] * 257)
    h = tiny.open([5] * 250)
    with pytest.raises(CapacityError):
        tiny.extend([(h, [6] * 7)])
    assert len(tiny.tokens(h)) == 250 and tiny.kv_length(h) == 250
    assert tiny.extend([(h, [6] * 6)]).shape == (6, 324)
    with pytest.raises(CapacityError):
        tiny.extend([(h, [7])])


def test_full_kv_cache_raises_capacity_and_rolls_back(tiny_gguf: object) -> None:
    with from_gguf(
        tiny_gguf, n_threads=1, n_ctx=200, kv_size=256, n_seq_max=4, kv_layout="unified"
    ) as m:  # type: ignore[arg-type]
        a = m.open([5] * 200)
        b = m.open([6] * 40)
        with pytest.raises(CapacityError):
            m.extend([(b, [7] * 60)])
        assert len(m.tokens(b)) == 40 and m.kv_length(b) == 40
        m.close(a)
        assert m.extend([(b, [7] * 60)]).shape == (60, 324)


def test_free_and_context_manager(tiny_gguf: object) -> None:
    with from_gguf(tiny_gguf, n_threads=1, n_ctx=64) as m:  # type: ignore[arg-type]
        h = m.open([1, 2, 3])
    assert m.freed and m.open_handles == 0
    with pytest.raises(HandleError):
        m.extend([(h, [4])])
    with pytest.raises(HandleError):
        m.open([])
    m.free()  # idempotent


def test_unified_layout_shares_prefixes_and_stays_close(tiny_gguf: object) -> None:
    # Unified KV: forks share cells; after holes are reused, logits may round differently
    # (documented), but they stay close and fresh sequences are exact.
    with from_gguf(tiny_gguf, n_threads=1, n_ctx=128, n_seq_max=8, kv_layout="unified") as m:  # type: ignore[arg-type]
        a = m.open(PROMPT)
        b = m.fork(a, 5)
        m.close(a)
        rows = m.extend([(b, [20, 21, 22])])
        expected = one_by_one(m, PROMPT[:5] + [20, 21, 22])[-3:]
        np.testing.assert_allclose(rows, expected, atol=0.2)
        assert (rows.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_chained_forks_before_any_decode(tiny: LlamaCppModel) -> None:
    # Stream copies are applied lazily at the next decode, in order.
    a = tiny.open(PROMPT)
    b = tiny.fork(a, 8)
    c = tiny.fork(b, 6)
    tiny.close(a)
    d = tiny.open([1, 2, 3])  # may reuse a's sequence id in the same decode as the copies
    rows = tiny.extend([(c, [30]), (d, [31]), (b, [32])])
    np.testing.assert_array_equal(rows[0], one_by_one(tiny, PROMPT[:6] + [30])[-1])
    np.testing.assert_array_equal(rows[1], one_by_one(tiny, [1, 2, 3, 31])[-1])
    np.testing.assert_array_equal(rows[2], one_by_one(tiny, PROMPT[:8] + [32])[-1])
