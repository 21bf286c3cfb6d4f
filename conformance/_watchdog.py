"""Running one check with a time limit, so a hung backend cannot hang the suite.

The check runs in a daemon worker thread; the caller waits at most ``timeout`` seconds.
A check still running then is *abandoned*, not stopped: Python cannot interrupt a
thread, least of all one stuck inside a native call (a llama.cpp decode, a CUDA
kernel), so the worker may keep running -- and keep the model it was using -- until
that call returns or the process exits. Being a daemon thread, it never keeps the
process alive.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["DEFAULT_TIMEOUT", "CheckTimeout", "call_with_timeout"]

T = TypeVar("T")

#: Seconds one check may take by default. The slowest check of a 135M-parameter model
#: on two busy cores takes about a minute; ten times that is a hang.
DEFAULT_TIMEOUT = 600.0


class CheckTimeout(Exception):
    """A check ran past its time limit and was abandoned.

    Attributes:
        seconds: the limit.
        thread: the abandoned worker thread (still alive when raised).
    """

    def __init__(self, seconds: float, thread: threading.Thread) -> None:
        super().__init__(f"timed out after {seconds:g} s")
        self.seconds = seconds
        self.thread = thread


def call_with_timeout(fn: Callable[[], T], timeout: float | None, *, name: str) -> T:
    """``fn()``, run in a daemon worker thread and waited for at most ``timeout`` seconds.

    Args:
        fn: the work; its exceptions are re-raised in the caller.
        timeout: seconds to wait; ``None`` runs ``fn`` in the calling thread, unlimited.
        name: names the worker thread (``conformance: NAME``), for debuggers and tests.

    Returns:
        What ``fn`` returned.

    Raises:
        CheckTimeout: ``fn`` was still running after ``timeout`` seconds; it is left
            running in its thread.
    """
    if timeout is None:
        return fn()
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    worker = threading.Thread(target=work, name=f"conformance: {name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise CheckTimeout(timeout, worker)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
