"""The conformance tiny GGUF lives in a private directory, never at a guessable name."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from backends.llama_cpp import BACKEND  # noqa: E402
from backends.llama_cpp._bundled import resolve_model_path, tiny_path  # noqa: E402

#: Where the tiny model used to be written, and loaded from if it existed.
OLD_NAME = "ssd-conformance-tiny-llama-v1.gguf"


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The system temporary folder, redirected to a folder of this test's own."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    forget = getattr(tiny_path, "cache_clear", lambda: None)
    forget()
    yield tmp_path
    forget()  # later tests write their own, in the real temporary folder


@pytest.mark.parametrize("plant", ["file", "symlink"])
def test_a_planted_file_at_the_old_name_is_never_loaded(temp_root: Path, plant: str) -> None:
    planted = temp_root / OLD_NAME
    bait = temp_root / "bait.gguf"
    bait.write_bytes(b"GGUF not the model the suite means")
    if plant == "file":
        planted.write_bytes(bait.read_bytes())
    else:
        planted.symlink_to(bait)

    path = resolve_model_path("tiny")
    assert path != planted and path.resolve() != bait.resolve()
    folder = path.parent
    assert folder.parent == temp_root and folder.name != ""
    info = folder.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    assert not path.is_symlink() and path.read_bytes()[:4] == b"GGUF"
    assert bait.read_bytes() == b"GGUF not the model the suite means"  # untouched
    model = BACKEND.load("tiny", {"n_threads": 1})
    try:
        assert model.vocab_size == 324
    finally:
        model.free()


def test_each_process_writes_once_and_the_name_is_unpredictable(temp_root: Path) -> None:
    first = tiny_path()
    assert tiny_path() == first  # once per process
    tiny_path.cache_clear()
    second = tiny_path()
    assert second.parent != first.parent  # a fresh private folder each time
    assert second.read_bytes() == first.read_bytes()  # the same weights
