"""Requests the state machine emits, and how a driver carries one out.

The machine never calls a model. It emits frozen request values, each addressed to one
*lane* (the target model or the draft model); a driver performs them -- inline, on a
lane's worker thread, or on a simulated clock -- and hands each result back. At most
one request per lane is outstanding at a time.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from ._protocol import Handle, Model

__all__ = ["Close", "Extend", "Fork", "Lane", "Open", "Purpose", "Request", "cost_of", "perform"]


class Lane(enum.Enum):
    """Which model a request is for."""

    TARGET = "target"
    DRAFT = "draft"


class Purpose(enum.Enum):
    """What an :class:`Extend` is for (timed separately in the metrics)."""

    VERIFY = "verify"  # the target scores a speculation (draws: accept, token)
    DRAFT = "draft"  # the draft proposes tokens just in time (draws: neural)
    GLUE = "glue"  # the draft scores the speculation being verified (no draws)
    TREE = "tree"  # one tree-decode step over the cached branches (draws: tree)

    @property
    def draws(self) -> bool:
        """Whether delivering the result makes random draws."""
        return self is not Purpose.GLUE


@attrs.frozen(kw_only=True)
class Open:
    """Open one handle per token list (prefill). Result: a tuple of handles."""

    lane: Lane
    prompts: tuple[tuple[int, ...], ...]


@attrs.frozen(kw_only=True)
class Extend:
    """Optionally truncate, then extend several handles in one batched call.

    ``items`` holds ``(handle, keep, tokens)``: the handle is first truncated to
    ``keep`` tokens when ``keep`` is not ``None``. Result: the logits array.
    """

    lane: Lane
    items: tuple[tuple[Handle, int | None, tuple[int, ...]], ...]
    purpose: Purpose

    @property
    def rows(self) -> int:
        return sum(len(toks) for _, _, toks in self.items)


@attrs.frozen(kw_only=True)
class Fork:
    """Fork ``(handle, length)`` pairs. Result: a tuple of new handles."""

    lane: Lane
    items: tuple[tuple[Handle, int], ...]


@attrs.frozen(kw_only=True)
class Close:
    """Close handles. Result: ``None``."""

    lane: Lane
    handles: tuple[Handle, ...]


Request = Open | Extend | Fork | Close


def _undo(model: Model, made: list[Handle], exc: BaseException) -> None:
    for h in made:
        try:
            model.close(h)
        except Exception as close_exc:  # keep the original failure; say what else broke
            exc.add_note(f"closing handle {h!r} it had made also failed: {close_exc!r}")


def perform(model: Model, request: Request) -> Any:
    """Carry out ``request`` on ``model`` and return the result the machine expects.

    Batches are atomic for handles: when opening or forking fails part-way, the handles
    this call had already made are closed before the error propagates, so a failed
    call leaves nothing behind. A failed ``Close`` still closes every other handle.
    """
    if isinstance(request, Extend):
        for handle, keep, _ in request.items:
            if keep is not None:
                model.truncate(handle, keep)
        return model.extend([(h, list(toks)) for h, _, toks in request.items])
    if isinstance(request, (Open, Fork)):
        made: list[Handle] = []
        try:
            if isinstance(request, Open):
                for p in request.prompts:
                    made.append(model.open(list(p)))
            else:
                for h, n in request.items:
                    made.append(model.fork(h, n))
        except BaseException as exc:
            _undo(model, made, exc)
            raise
        return tuple(made)
    if isinstance(request, Close):
        first: BaseException | None = None
        for h in request.handles:
            try:
                model.close(h)
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first
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
