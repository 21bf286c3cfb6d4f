"""Choosing an execution provider, and finding out which one really runs.

``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` in ``get_available_providers()``
whether or not the CUDA and cuDNN libraries can be loaded; when they cannot, a session
asked for CUDA logs an error and silently runs on the CPU. So the list alone proves
nothing: we create the session and read back ``session.get_providers()``.

onnxruntime's own lines about that (a red error and a yellow warning per session) are
held back while the session is made, unless ``engine_logs``; the fallback is reported
as one warning of ours, with the cause (the library that failed to load), once per
process. After a failed automatic try, later automatic choices skip CUDA.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs

from ssd_core import ConfigError

__all__ = ["CPU", "CUDA", "ProviderChoice", "create_session", "cuda_load_error"]

_log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: The order tried when the caller names no providers.
PREFERENCE = (CUDA, CPU)

SessionFactory = Callable[..., Any]

#: onnxruntime's default-logger severities: 2 (warning) is its default, 4 (fatal) the
#: quietest.
_ORT_DEFAULT_SEVERITY = 2
_ORT_QUIET_SEVERITY = 4

_lock = threading.Lock()
#: Session factories whose automatic CUDA try fell back (the real one: _default_factory).
_cuda_failed: set[Any] = set()
#: (factory, requested, active) fallbacks already reported with a warning.
_reported: set[tuple[Any, str, str]] = set()


@attrs.frozen(kw_only=True)
class ProviderChoice:
    """What was asked for and what the session ended up using.

    Attributes:
        requested: the providers passed to the session, in order.
        active: ``session.get_providers()`` after creation, in order.
        fell_back: a provider that was asked for first is not the one in use.
    """

    requested: tuple[str, ...]
    active: tuple[str, ...]

    @property
    def provider(self) -> str:
        """The provider that runs the graph (the first active one)."""
        return self.active[0]

    @property
    def fell_back(self) -> bool:
        return bool(self.requested) and self.provider != self.requested[0]


def _default_factory(path: str, **kwargs: Any) -> Any:
    import onnxruntime

    return onnxruntime.InferenceSession(path, **kwargs)


def _default_available() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


@contextlib.contextmanager
def _quiet_onnxruntime(quiet: bool) -> Iterator[None]:
    """Raise onnxruntime's default-logger threshold to fatal for the block."""
    if not quiet:
        yield
        return
    try:
        import onnxruntime
    except ImportError:  # a test double without onnxruntime
        yield
        return
    onnxruntime.set_default_logger_severity(_ORT_QUIET_SEVERITY)
    try:
        yield
    finally:
        onnxruntime.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


def cuda_load_error() -> str | None:
    """Why onnxruntime's CUDA provider library cannot be loaded, or ``None`` if it loads
    (or cannot be found to check). Loading it is what onnxruntime does first; the
    dynamic loader names the missing library (e.g. ``libcublasLt.so.13``)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    folder = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
    for name in ("libonnxruntime_providers_cuda.so", "onnxruntime_providers_cuda.dll"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            try:
                ctypes.CDLL(path)
            except OSError as exc:
                return str(exc).strip() or type(exc).__name__
            return None
    return None


def _report_fallback(choice: ProviderChoice, factory: Any) -> None:
    key = (factory, choice.requested[0], choice.provider)
    with _lock:
        first = key not in _reported
        _reported.add(key)
    if not first:
        _log.info("onnxruntime: %s unavailable again; on %s", choice.requested[0], choice.provider)
        return
    cause = cuda_load_error() if choice.requested[0] == CUDA else None
    _log.warning(
        "onnxruntime: %s could not be used (%s); running on %s",
        "the CUDA provider" if choice.requested[0] == CUDA else choice.requested[0],
        cause or "its libraries are missing or no device is usable",
        "the CPU" if choice.provider == CPU else choice.provider,
    )


def _ort_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's session-creation exceptions (they derive from ``Exception`` only)."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as state
    except ImportError:  # a test double without onnxruntime
        return ()
    names = (
        "Fail",
        "InvalidArgument",
        "NoSuchFile",
        "NoModel",
        "InvalidProtobuf",
        "InvalidGraph",
        "NotImplemented",
        "RuntimeException",
        "EPFail",
    )
    return tuple(getattr(state, n) for n in names if hasattr(state, n))


def create_session(
    path: str,
    *,
    providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
    session_options: Any = None,
    available: Callable[[], Sequence[str]] = _default_available,
    factory: SessionFactory = _default_factory,
    engine_logs: bool = False,
) -> tuple[Any, ProviderChoice]:
    """Create an inference session on the best provider that actually loads.

    With ``providers=None`` the CUDA provider is tried when ``available()`` lists it
    (and no earlier automatic try in this process failed), then the CPU provider; a
    session that came up without CUDA is reported as a fallback: one warning naming the
    cause, the first time only. Explicit ``providers`` are passed through as given
    (names or ``(name, options)`` pairs) and the outcome is reported the same way.

    Args:
        path: the ``.onnx`` file.
        providers: provider names (or ``(name, options)`` pairs) in preference order,
            or ``None`` to choose automatically.
        session_options: an ``onnxruntime.SessionOptions`` or ``None``.
        available: returns the providers this onnxruntime build lists (injected by tests).
        factory: ``factory(path, providers=..., sess_options=...)`` makes the session
            (injected by tests).
        engine_logs: let onnxruntime's own log lines (e.g. its errors about CUDA
            libraries it cannot load) reach stderr while the session is made.

    Returns:
        ``(session, ProviderChoice)``.

    Raises:
        ConfigError: none of the named providers is listed by this onnxruntime build,
            or onnxruntime cannot build the session (a kernel missing for a dtype on
            this provider, an invalid graph).
    """
    listed = list(available())
    if providers is None:
        wanted: list[Any] = [p for p in PREFERENCE if p in listed] or [CPU]
        with _lock:
            skip_cuda = factory in _cuda_failed
        if skip_cuda and CUDA in wanted:
            _log.info("onnxruntime: the CUDA provider failed earlier in this process; using CPU")
            wanted = [p for p in wanted if p != CUDA] or [CPU]
    else:
        wanted = list(providers)
        names = [p if isinstance(p, str) else p[0] for p in wanted]
        missing = [n for n in names if n not in listed]
        if len(missing) == len(names):
            raise ConfigError(
                f"none of the providers {names} is available in this onnxruntime build "
                f"(it lists {listed})"
            )
        if missing:
            _log.info("providers %s are not listed by onnxruntime; skipping them", missing)
            wanted = [p for p, n in zip(wanted, names, strict=True) if n not in missing]
    requested = tuple(p if isinstance(p, str) else p[0] for p in wanted)
    try:
        with _quiet_onnxruntime(not engine_logs and requested[0] != CPU):
            session = factory(path, providers=wanted, sess_options=session_options)
    except _ort_errors() as exc:  # e.g. no kernel for a bfloat16 op on this provider
        raise ConfigError(
            f"onnxruntime cannot run {path} on {requested}: {str(exc).strip()[:500]}"
        ) from exc
    choice = ProviderChoice(requested=requested, active=tuple(session.get_providers()))
    if choice.fell_back:
        if providers is None and choice.requested[0] == CUDA:
            with _lock:
                _cuda_failed.add(factory)
        _report_fallback(choice, factory)
    else:
        _log.info("onnxruntime: session on %s", choice.provider)
    return session, choice
