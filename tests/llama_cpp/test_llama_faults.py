"""A llama.cpp call that fails partway leaves no handle or sequence slot behind (issue 11,
D2), and slots grow on demand without changing any logits (issue 10, item 4)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest

from backends.llama_cpp import LlamaCppModel, from_gguf
from backends.llama_cpp._batch import LogitsView
from backends.ngram import NgramModel
from ssd_core import (
    BackendContractError,
    CapacityError,
    SamplingParams,
    SSDConfig,
    generate,
)

PROMPT = [1, 17, 300, 301, 302, 45, 99, 7, 250, 310]
GREEDY = SamplingParams(temperature=0.0)


class Boom(RuntimeError):
    """The injected fault."""


def fail_once(monkeypatch: pytest.MonkeyPatch, name: str, after: int = 0) -> list[int]:
    """Make ``llama_cpp.<name>`` raise on its ``after``-th call (0 = the next), once."""
    real = getattr(llama_cpp, name)
    calls = [0]

    def flaky(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] == after + 1:
            raise Boom(f"injected failure in {name}")
        return real(*args)

    monkeypatch.setattr(llama_cpp, name, flaky)
    return calls


def one_by_one(model: LlamaCppModel, tokens: list[int]) -> np.ndarray:
    h = model.open([])
    rows = [model.extend([(h, [t])])[0] for t in tokens]
    model.close(h)
    return np.stack(rows)


def assert_clean(model: LlamaCppModel) -> None:
    assert model.open_handles == 0
    assert model.free_slots == model.slots
    # every slot can be taken again, up to n_seq_max
    hs = [model.open([1, 2]) for _ in range(model.options.n_seq_max)]
    with pytest.raises(CapacityError):
        model.open([1])
    for h in hs:
        model.close(h)


@pytest.fixture
def small(tiny_gguf: Path) -> Iterator[LlamaCppModel]:
    model = from_gguf(tiny_gguf, n_threads=1, n_ctx=128, n_seq_max=8)
    yield model
    model.free()


def test_open_failing_in_decode_releases_its_slot(
    small: LlamaCppModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_once(monkeypatch, "llama_decode")
    with pytest.raises(Boom):
        small.open(PROMPT)
    monkeypatch.undo()
    assert_clean(small)


def test_fork_failing_in_copy_releases_its_slot(
    small: LlamaCppModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = small.open(PROMPT)
    fail_once(monkeypatch, "llama_memory_seq_cp")
    with pytest.raises(Boom):
        small.fork(a, 5)
    monkeypatch.undo()
    assert small.open_handles == 1 and small.free_slots == small.slots - 1
    b = small.fork(a, 5)
    np.testing.assert_array_equal(
        small.extend([(b, [20])])[0], one_by_one(small, PROMPT[:5] + [20])[-1]
    )
    small.close(a)
    small.close(b)
    assert_clean(small)


@pytest.mark.parametrize("after", [0, 1])
def test_extend_failing_partway_rolls_back(
    tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch, after: int
) -> None:
    # Two decodes for 10 tokens (chunks of 6): fail the first or the second.
    with from_gguf(tiny_gguf, n_threads=1, n_ctx=128, invariant_batch=6) as m:
        a, b = m.open(PROMPT[:4]), m.open(PROMPT[:3])
        fail_once(monkeypatch, "llama_decode", after=after)
        with pytest.raises(Boom):
            m.extend([(a, [30] * 5), (b, [31] * 5)])
        monkeypatch.undo()
        assert m.tokens(a) == PROMPT[:4] and m.kv_length(a) == 4
        assert m.tokens(b) == PROMPT[:3] and m.kv_length(b) == 3
        rows = m.extend([(a, [30] * 5), (b, [31] * 5)])
        np.testing.assert_array_equal(rows[4], one_by_one(m, PROMPT[:4] + [30] * 5)[-1])
        m.close(a)
        m.close(b)
        assert m.free_slots == m.slots


def test_interrupt_in_extend_rolls_back(
    small: LlamaCppModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = small.open(PROMPT)
    real = LogitsView.rows

    def interrupted(self: LogitsView, ctx: Any, n: int) -> np.ndarray:
        raise KeyboardInterrupt

    monkeypatch.setattr(LogitsView, "rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        small.extend([(a, [5, 6])])
    monkeypatch.setattr(LogitsView, "rows", real)
    assert small.tokens(a) == PROMPT and small.kv_length(a) == len(PROMPT)
    small.close(a)
    assert_clean(small)


def test_nan_logits_raise_and_roll_back(
    small: LlamaCppModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = small.open(PROMPT)
    real = LogitsView.rows

    def poisoned(self: LogitsView, ctx: Any, n: int) -> np.ndarray:
        rows = real(self, ctx, n).copy()
        rows[0, 7] = np.nan
        return rows

    monkeypatch.setattr(LogitsView, "rows", poisoned)
    with pytest.raises(BackendContractError, match="NaN"):
        small.extend([(a, [5])])
    monkeypatch.undo()
    assert small.tokens(a) == PROMPT and small.kv_length(a) == len(PROMPT)
    small.close(a)


# adaptive=False below: the tiny draft costs what its target does, so the speculation
# policy would rightly not draft at all, and these tests need the draft lane busy.


def test_every_later_run_gets_its_slots_after_faults(
    tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reported case: an SSD run whose draft fork fails once must not pin slots,
    # or every later run fails with "all N sequences are in use".
    with (
        from_gguf(tiny_gguf, n_threads=1, n_ctx=256, n_seq_max=4) as target,
        from_gguf(tiny_gguf, n_threads=1, n_ctx=256, n_seq_max=28, batch_invariant=False) as draft,
    ):
        prompts = [PROMPT[:5], PROMPT[3:]]
        expected = generate(
            target, None, prompts=prompts, mode="ar", max_new_tokens=16, sampling=GREEDY
        ).tokens
        for name, after in (("llama_memory_seq_cp", 3), ("llama_decode", 5), ("llama_decode", 0)):
            fail_once(monkeypatch, name, after=after)
            with pytest.raises(Exception):  # noqa: B017 - the core wraps the backend's error
                generate(
                    target, draft, prompts=prompts, mode="ssd", max_new_tokens=16,
                    sampling=GREEDY, config=SSDConfig(k=4, fanout=12, adaptive=False), seed=0, on_draft_error="raise",
                )  # fmt: skip
            monkeypatch.undo()
            # Whatever the core closed or not, the backends' books balance:
            for m in (target, draft):
                assert m.free_slots + m.open_handles == m.slots
            for m in (target, draft):  # handles the core left open are closed here
                for h in list(m._table.handles()):
                    m.close(h)
            res = generate(
                target, draft, prompts=prompts, mode="ssd", max_new_tokens=16,
                sampling=GREEDY, config=SSDConfig(k=4, fanout=12, adaptive=False), seed=0,
            )  # fmt: skip
            assert res.tokens == expected


# -- slots that grow -----------------------------------------------------------------


def test_target_starts_with_one_slot_and_grows(tiny_gguf: Path) -> None:
    with from_gguf(tiny_gguf, n_threads=1, n_ctx=128, n_seq_max=8) as m:
        assert m.slots == 1 and m.max_handles == 8
        a = m.open(PROMPT)
        m.extend([(a, [40, 41])])
        b = m.fork(a, 6)  # grows to 2
        assert m.slots == 2
        c = m.open(PROMPT[:3])  # grows to 4
        d = m.fork(c, 3)
        assert m.slots == 4
        rows = m.extend([(a, [50]), (b, [51]), (c, [52]), (d, [53])])
        np.testing.assert_array_equal(rows[0], one_by_one(m, PROMPT + [40, 41, 50])[-1])
        np.testing.assert_array_equal(rows[1], one_by_one(m, PROMPT[:6] + [51])[-1])
        np.testing.assert_array_equal(rows[2], one_by_one(m, PROMPT[:3] + [52])[-1])
        np.testing.assert_array_equal(rows[3], one_by_one(m, PROMPT[:3] + [53])[-1])
        hs = [m.open([1]) for _ in range(4)]  # grows to 8 = n_seq_max
        assert m.slots == 8
        with pytest.raises(CapacityError, match="n_seq_max=8"):
            m.open([1])
        for h in [a, b, c, d, *hs]:
            m.close(h)
        assert m.free_slots == 8


@pytest.mark.parametrize("flash_attn", ["auto", "off"])
def test_growth_gives_the_same_logits_as_preallocated_slots(
    tiny_gguf: Path, flash_attn: str
) -> None:
    # With flash attention off the prompt is prefilled in one batch (llama-cpp-python's
    # way); regrowth must replay the same chunks, so compare with a model that never grew.
    def run(n_seq: int) -> np.ndarray:
        with from_gguf(
            tiny_gguf, n_threads=1, n_ctx=128, n_seq_max=8, n_seq=n_seq, flash_attn=flash_attn
        ) as m:
            a = m.open(PROMPT)
            m.extend([(a, [40, 41, 42])])
            b = m.fork(a, 12)
            m.truncate(a, 11)
            hs = [m.open(PROMPT[:4]) for _ in range(5)]
            rows = m.extend([(a, [60]), (b, [61]), *((h, [62]) for h in hs)])
            assert m.slots == 8  # grew 1 -> 2 -> 4 -> 8, or preallocated
            return rows

    np.testing.assert_array_equal(run(1), run(8))


def test_growth_failure_keeps_every_handle(
    tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with from_gguf(tiny_gguf, n_threads=1, n_ctx=128, n_seq_max=4) as m:
        a = m.open(PROMPT)
        before = m.extend([(a, [70])])[0]
        m.truncate(a, len(PROMPT))
        monkeypatch.setattr(llama_cpp, "llama_init_from_model", lambda *args: None)
        with pytest.raises(CapacityError, match="could not create a context"):
            m.open([1, 2])
        monkeypatch.undo()
        fail_once(monkeypatch, "llama_decode")  # the replay into the new context fails
        with pytest.raises(Boom):
            m.open([1, 2])
        monkeypatch.undo()
        assert m.slots == 1 and m.open_handles == 1
        np.testing.assert_array_equal(m.extend([(a, [70])])[0], before)
        b = m.open([1, 2])  # now it grows
        assert m.slots == 2
        m.close(a)
        m.close(b)


def test_ssd_with_a_growing_draft_equals_ar(tiny_gguf: Path) -> None:
    with (
        from_gguf(tiny_gguf, n_threads=1, n_ctx=256) as target,
        from_gguf(tiny_gguf, n_threads=1, n_ctx=256, n_seq_max=32) as draft,
    ):
        prompts = [PROMPT[:5], PROMPT[2:]]
        ar = generate(target, None, prompts=prompts, mode="ar", max_new_tokens=20, sampling=GREEDY)
        for mode in ("sd", "ssd"):
            res = generate(
                target, draft, prompts=prompts, mode=mode, max_new_tokens=20, sampling=GREEDY,
                config=SSDConfig(k=4, fanout=6, adaptive=False), seed=0,
            )  # fmt: skip
            assert res.tokens == ar.tokens
        assert target.slots == 2 and draft.slots > 2
        ngram = NgramModel(vocab_size=target.vocab_size)
        res = generate(
            target, ngram, prompts=prompts * 2, mode="ssd", max_new_tokens=8, sampling=GREEDY
        )
        assert target.slots == 4


def test_growth_past_the_decode_chunk(tiny_gguf: Path) -> None:
    # llama.cpp asserts (aborts the process) if a context has more sequences than its
    # batch size; 64 slots exceed the 63-token decode chunk.
    with from_gguf(tiny_gguf, n_threads=1, n_ctx=32, n_seq_max=64) as m:
        hs = [m.open([1, 2, 3]) for _ in range(64)]
        assert m.slots == 64
        rows = m.extend([(h, [4]) for h in hs])
        assert rows.shape == (64, 324) and (rows == rows[0]).all()
        for h in hs:
            m.close(h)
