"""Capacities computed in Python ints and refused before llama.cpp allocates (issue 11,
D4; issue 13: a clear error naming the cause when the context does not fit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.llama_cpp import LlamaOptions, _memory, from_gguf
from ssd_core import CapacityError, ConfigError


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"n_ctx": 1_000_000_000}, ["n_ctx=1000000000", "n_seq_max=16", "32-bit"]),
        ({"n_ctx": 300_000_000, "n_seq_max": 15}, ["n_ctx", "n_seq_max", "32-bit"]),
        ({"n_ctx": 2**31}, ["n_ctx", "32-bit positions"]),
        ({"n_seq_max": 257}, ["n_seq_max=257", "256"]),
        ({"n_seq": 5, "n_seq_max": 4}, ["n_seq=5", "n_seq_max=4"]),
        ({"kv_layout": "unified", "kv_size": 2**32}, ["kv_size", "32-bit"]),
    ],
)
def test_sizes_that_wrap_32_bits_are_refused(options: dict[str, int], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        LlamaOptions(**options)
    for word in words:
        assert word in str(info.value)


def test_a_kv_cache_beyond_memory_is_refused_before_allocating(tiny_gguf: Path) -> None:
    # 2**31 cells of the tiny model need 512 GiB: refused before llama.cpp allocates
    # (before the fix llama.cpp tried, and the process grew until the OOM killer came).
    with pytest.raises(ConfigError) as info:
        from_gguf(tiny_gguf, n_threads=1, n_ctx=2**31 - 1, n_seq_max=1)
    text = str(info.value)
    assert "n_ctx=2147483647" in text and "available" in text and "lower n_ctx" in text


def test_memory_estimate_uses_the_model_metadata(tiny_gguf: Path) -> None:
    with from_gguf(tiny_gguf, n_threads=1, n_ctx=64) as m:
        # 2 layers x (16 + 16 head dims) x 2 KV heads x 2 bytes (f16)
        assert m.kv_bytes_per_cell == 2 * (16 + 16) * 2 * 2


def test_growth_beyond_memory_is_a_capacity_error(
    tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with from_gguf(tiny_gguf, n_threads=1, n_ctx=1024, n_seq_max=16) as m:
        a = m.open([1, 2, 3])
        # Pretend only room for a bit more than one slot's cache is left.
        monkeypatch.setattr(_memory, "available_bytes", lambda: 1024 * 256 + 1)
        monkeypatch.setattr("backends.llama_cpp._model.available_bytes", lambda: 1024 * 256 + 1)
        with pytest.raises(CapacityError) as info:
            m.open([4])
        assert "n_ctx=1024 x 2 sequence slot(s)" in str(info.value)
        assert m.slots == 1 and m.open_handles == 1 and m.tokens(a) == [1, 2, 3]
        monkeypatch.undo()
        b = m.open([4])
        m.close(a)
        m.close(b)


def test_available_memory_is_known_here() -> None:
    room = _memory.available_bytes()
    assert room is None or room >= 0


def test_directory_is_not_called_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        from_gguf(tmp_path)
