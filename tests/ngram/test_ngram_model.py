"""The n-gram / prompt-lookup draft backend (no engine needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.ngram import NgramModel, parse_spec
from ssd_core import CapacityError, ConfigError, HandleError, InputError, Model
from ssd_core.app import load_backend


def test_is_a_model() -> None:
    m = NgramModel(vocab_size=16)
    assert isinstance(m, Model)
    assert m.tokenizer is None and m.context_size is None


def test_counts_follow_the_longest_suffix() -> None:
    m = NgramModel(vocab_size=10, max_n=2, alpha=0.5, escape=0.0)
    h = m.open([1, 2, 3, 1, 2])
    row = m.extend([(h, [3])])[0]
    p = np.exp(row)
    # (2, 3) was followed by 1 once: p(1) = (1 + .5) / (1 + .5 * 10).
    assert p[1] == pytest.approx(1.5 / 6.0)
    assert p[4] == pytest.approx(0.5 / 6.0)
    assert p.sum() == pytest.approx(1.0)
    assert m.match_length(h) == 2


def test_falls_back_to_shorter_suffix_then_unigram_then_uniform() -> None:
    m = NgramModel(vocab_size=8, max_n=3, alpha=1.0, escape=0.0)
    assert np.allclose(m.logits([]), -math.log(8))
    h = m.open([5, 6, 5])
    p = np.exp(m.extend([(h, [7])])[0])  # 7 never seen before: unigram counts 5:2, 6:1, 7:1
    assert p[5] == pytest.approx(3 / 12) and p[6] == pytest.approx(2 / 12)
    p = np.exp(m.extend([(h, [5])])[0])  # suffix (5,) was followed by 6 and 7
    assert p[6] == pytest.approx(2 / 10) and p[7] == pytest.approx(2 / 10)


@pytest.mark.parametrize(("history", "n", "e"), [
    ([9, 1, 2, 9], 1, 3.0),  # (9,) followed by 1 once: top 1 / (1 + 3) ~ 0.25
    ([8, 9, 1, 2, 8, 9], 2, 0.75),  # (8, 9) followed by 1 once: ~ 0.57
    ([7, 8, 9, 1, 2, 7, 8, 9], 3, 0.1875),  # (7, 8, 9) followed by 1 once: ~ 0.84
])  # fmt: skip
def test_the_escape_mass_shrinks_with_the_match_length(history, n, e) -> None:
    """A follower seen once is trusted more the longer the match it followed, so the
    row's top probability can say how often the draft is right."""
    v = 1000
    m = NgramModel(vocab_size=v, max_n=3, alpha=1e-12)
    h = m.open(history[:-1])
    p = np.exp(m.extend([(h, history[-1:])])[0])
    assert m.match_length(h) == n
    assert p[1] == pytest.approx((1 + e / v) / (1 + e), rel=1e-6)
    assert p[5] == pytest.approx((e / v) / (1 + e), rel=1e-6)  # the rest, spread evenly
    assert p.sum() == pytest.approx(1.0)
    fork = m.fork(h, len(history))  # a fork finds its matches by scanning: same rows
    assert np.array_equal(m.extend([(fork, [1])])[0], m.extend([(h, [1])])[0])
    with pytest.raises(ConfigError):
        NgramModel(vocab_size=10, escape=-1.0)


def test_every_token_has_positive_probability() -> None:
    m = NgramModel(vocab_size=50, max_n=3, alpha=1e-6)
    h = m.open([1, 2, 3] * 10)
    rows = m.extend([(h, [1, 2])])
    assert np.isfinite(rows).all()
    assert np.allclose(np.exp(rows).sum(axis=1), 1.0)
    assert rows[1].argmax() == 3


ops = st.lists(
    st.tuples(
        st.sampled_from(["extend", "fork", "truncate", "close"]),
        st.integers(0, 10_000),
        st.lists(st.integers(0, 5), min_size=1, max_size=6),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(prompt=st.lists(st.integers(0, 5), max_size=12), script=ops, max_n=st.integers(1, 4))
def test_incremental_index_equals_fresh(prompt: list[int], script: list, max_n: int) -> None:
    m = NgramModel(vocab_size=6, max_n=max_n, alpha=0.1)
    live = [m.open(prompt)]
    for op, r, toks in script:
        h = live[r % len(live)]
        n = len(m.tokens(h))
        if op == "extend":
            rows = m.extend([(h, toks)])
            full = m.tokens(h)
            for j in range(len(toks)):
                np.testing.assert_allclose(rows[j], m.logits(full[: n + j + 1]), rtol=0, atol=1e-12)
        elif op == "fork":
            live.append(m.fork(h, r % (n + 1)))
        elif op == "truncate":
            m.truncate(h, r % (n + 1))
        elif len(live) > 1:
            m.close(h)
            live.remove(h)
    for h in live:  # every surviving index still matches its token list
        toks = m.tokens(h)
        row = m.extend([(h, [0])])[0]
        np.testing.assert_allclose(row, m.logits(toks + [0]), rtol=0, atol=1e-12)


def test_fork_and_batched_extend_are_independent() -> None:
    m = NgramModel(vocab_size=6, max_n=2)
    a = m.open([1, 2, 1, 2, 1])
    b = m.fork(a, 3)
    rows = m.extend([(a, [2]), (b, [3, 3])])
    np.testing.assert_array_equal(rows[0], m.logits([1, 2, 1, 2, 1, 2]))
    np.testing.assert_array_equal(rows[2], m.logits([1, 2, 1, 3, 3]))


def test_errors() -> None:
    m = NgramModel(vocab_size=4, context_size=5)
    h = m.open([1, 2])
    with pytest.raises(InputError):
        m.extend([(h, [4])])
    with pytest.raises(InputError):
        m.extend([(h, [])])
    with pytest.raises(CapacityError):
        m.extend([(h, [1, 1, 1, 1])])
    with pytest.raises(HandleError):
        m.truncate(h, 3)
    m.close(h)
    with pytest.raises(HandleError):
        m.extend([(h, [1])])
    assert m.open_handles == 0
    for bad in ({"vocab_size": 0}, {"vocab_size": 3, "max_n": 0}, {"vocab_size": 3, "alpha": 0.0}):
        with pytest.raises(ConfigError):
            NgramModel(**bad)


def test_backend_spec() -> None:
    spec = load_backend("ngram")
    m = spec.load("max_n=4,alpha=0.5", {"vocab_size": 100, "threads": 2})
    assert isinstance(m, NgramModel) and (m.max_n, m.alpha, m.vocab_size) == (4, 0.5, 100)
    assert parse_spec("") == {}
    with pytest.raises(ConfigError):
        spec.load("max_n=2", {})
    with pytest.raises(ConfigError):
        spec.load("bogus=1", {"vocab_size": 10})
    with pytest.raises(ConfigError):
        spec.load("vocab_size=5", {"vocab_size": 10})


def test_forked_handles_scan_and_match_the_indexed_path() -> None:
    rng = np.random.default_rng(0)
    toks = [int(t) for t in rng.integers(0, 7, size=200)]
    m = NgramModel(vocab_size=7, max_n=3, alpha=1e-3)
    a = m.open(toks[:100])
    b = m.fork(a, 100)  # scanned
    rows_a = m.extend([(a, toks[100:])])
    rows_b = m.extend([(b, toks[100:])])
    np.testing.assert_array_equal(rows_a, rows_b)
    assert m.match_length(a) == m.match_length(b) > 0
    m.truncate(b, 50)
    np.testing.assert_array_equal(m.extend([(b, [3])])[0], m.logits(toks[:50] + [3]))
