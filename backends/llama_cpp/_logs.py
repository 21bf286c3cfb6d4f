"""llama.cpp's own log lines: dropped unless a live model asked for them (``verbose``).

llama.cpp reports through one process-wide callback. llama-cpp-python installs one
that maps ggml's levels with an outdated table (``WARN`` = 3 is printed as an error),
so warnings such as "n_ctx_seq > n_ctx_train" reached stderr even with
``verbose=False``. This module installs its own callback (once, when the first model is
built; it replaces llama-cpp-python's for the whole process):

* while any live model has ``verbose=True``, every line goes to stderr unchanged;
* otherwise lines go to the ``backends.llama_cpp.native`` logger at DEBUG (invisible
  unless the application turns DEBUG on) and are otherwise dropped;
* warnings and errors are also kept in a short ring buffer, so an error raised after a
  failed C call can quote what llama.cpp said (:func:`recent`).

Lines ggml writes straight to stderr with ``fprintf`` bypass the callback and are not
affected.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import sys
import threading

import llama_cpp

__all__ = ["install", "recent", "verbose_model"]

logger = logging.getLogger("backends.llama_cpp.native")

# enum ggml_log_level in the llama.cpp that llama-cpp-python 0.3.x wraps.
_NONE, _DEBUG, _INFO, _WARN, _ERROR, _CONT = range(6)

_lock = threading.Lock()
_installed = False
_verbose_models = 0
_last_level = _INFO
_recent: collections.deque[str] = collections.deque(maxlen=16)


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _on_log(level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
    global _last_level
    msg = text.decode("utf-8", errors="replace") if text else ""
    if level == _CONT:
        level = _last_level
    else:
        _last_level = level
    if level >= _WARN and msg.strip():
        _recent.append(msg.strip())
    if _verbose_models > 0:
        sys.stderr.write(msg)
        sys.stderr.flush()
    elif logger.isEnabledFor(logging.DEBUG) and msg.strip():
        logger.debug("%s", msg.rstrip("\n"))


def install() -> None:
    """Route llama.cpp's log through :func:`_on_log` (idempotent)."""
    global _installed
    with _lock:
        if not _installed:
            llama_cpp.llama_log_set(_on_log, ctypes.c_void_p(0))
            _installed = True


def verbose_model(delta: int) -> None:
    """Count a live model with ``verbose=True`` in (``+1``) or out (``-1``)."""
    global _verbose_models
    with _lock:
        _verbose_models = max(0, _verbose_models + delta)


def recent(clear: bool = False) -> str:
    """The last warnings and errors llama.cpp logged, joined with ``"; "`` (``""`` if none).

    Args:
        clear: forget them afterwards (call with ``True`` before a C call whose failure
            you want to explain, then read after it).
    """
    text = "; ".join(_recent)
    if clear:
        _recent.clear()
    return text
