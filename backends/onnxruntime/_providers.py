"""Choosing an execution provider, and finding out which one really runs.

``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` in ``get_available_providers()``
whether or not the CUDA and cuDNN libraries can be loaded; when they cannot, a session
asked for CUDA logs an error and silently runs on the CPU. So the list alone proves
nothing: we create the session and read back ``session.get_providers()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from ssd_core import ConfigError

__all__ = ["CPU", "CUDA", "ProviderChoice", "create_session"]

_log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: The order tried when the caller names no providers.
PREFERENCE = (CUDA, CPU)

SessionFactory = Callable[..., Any]


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
) -> tuple[Any, ProviderChoice]:
    """Create an inference session on the best provider that actually loads.

    With ``providers=None`` the CUDA provider is tried when ``available()`` lists it,
    then the CPU provider; a session that silently came up without CUDA is reported as
    a fallback (a warning is logged). Explicit ``providers`` are passed through as given
    (names or ``(name, options)`` pairs) and the outcome is reported the same way.

    Args:
        path: the ``.onnx`` file.
        providers: provider names (or ``(name, options)`` pairs) in preference order,
            or ``None`` to choose automatically.
        session_options: an ``onnxruntime.SessionOptions`` or ``None``.
        available: returns the providers this onnxruntime build lists (injected by tests).
        factory: ``factory(path, providers=..., sess_options=...)`` makes the session
            (injected by tests).

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
        session = factory(path, providers=wanted, sess_options=session_options)
    except _ort_errors() as exc:  # e.g. no kernel for a bfloat16 op on this provider
        raise ConfigError(
            f"onnxruntime cannot run {path} on {requested}: {str(exc).strip()[:500]}"
        ) from exc
    choice = ProviderChoice(requested=requested, active=tuple(session.get_providers()))
    if choice.fell_back:
        _log.warning(
            "onnxruntime: asked for %s but the session runs on %s (provider libraries "
            "missing?); continuing on %s",
            choice.requested[0],
            choice.provider,
            choice.provider,
        )
    else:
        _log.info("onnxruntime: session on %s", choice.provider)
    return session, choice
