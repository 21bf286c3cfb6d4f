"""Requests the state machine emits, and how a driver carries one out.

The machine never calls a model. It emits frozen request values, each addressed to one
*lane* (the target model or the draft model); a driver performs them -- in order, on
threads, or on a simulated clock -- and hands each result back. At most one request
per lane is outstanding at a time.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from ._protocol import Handle, Model

__all__ = ["Close", "Extend", "Fork", "Lane", "Open", "Request", "cost_of", "perform"]


class Lane(enum.Enum):
    """Which model a request is for."""

    TARGET = "target"
    DRAFT = "draft"


@attrs.frozen(kw_only=True)
class Open:
    """Open one handle per token list (prefill). Result: a tuple of handles."""

    id: int
    lane: Lane
    prompts: tuple[tuple[int, ...], ...]


@attrs.frozen(kw_only=True)
class Extend:
    """Optionally truncate, then extend several handles in one batched call.

    ``items`` holds ``(handle, keep, tokens)``: the handle is first truncated to
    ``keep`` tokens when ``keep`` is not ``None``. Result: the logits array.
    """

    id: int
    lane: Lane
    items: tuple[tuple[Handle, int | None, tuple[int, ...]], ...]
    purpose: str

    @property
    def rows(self) -> int:
        return sum(len(toks) for _, _, toks in self.items)


@attrs.frozen(kw_only=True)
class Fork:
    """Fork ``(handle, length)`` pairs. Result: a tuple of new handles."""

    id: int
    lane: Lane
    items: tuple[tuple[Handle, int], ...]


@attrs.frozen(kw_only=True)
class Close:
    """Close handles. Result: ``None``."""

    id: int
    lane: Lane
    handles: tuple[Handle, ...]


Request = Open | Extend | Fork | Close


def perform(model: Model, request: Request) -> Any:
    """Carry out ``request`` on ``model`` and return the result the machine expects."""
    if isinstance(request, Extend):
        for handle, keep, _ in request.items:
            if keep is not None:
                model.truncate(handle, keep)
        return model.extend([(h, list(toks)) for h, _, toks in request.items])
    if isinstance(request, Fork):
        return tuple(model.fork(h, n) for h, n in request.items)
    if isinstance(request, Open):
        return tuple(model.open(list(p)) for p in request.prompts)
    if isinstance(request, Close):
        for h in request.handles:
            model.close(h)
        return None
    raise TypeError(f"not a request: {request!r}")


def cost_of(model: Model, request: Request) -> float | None:
    """The modelled cost of ``request`` from the model's ``latency`` attribute, if any."""
    latency = getattr(model, "latency", None)
    if latency is None:
        return None
    if isinstance(request, Extend):
        return float(latency.extend_cost(len(request.items), request.rows))
    if isinstance(request, Open):
        return float(sum(latency.open_cost(len(p)) for p in request.prompts))
    if isinstance(request, Fork):
        return float(latency.cache_op_cost(len(request.items)))
    return 0.0
