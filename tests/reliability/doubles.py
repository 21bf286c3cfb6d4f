"""Test doubles for the reliability tests: a model wrapper that records every call and
every close per handle, notices overlapping calls and closes under a running call, and
injects faults (an exception, NaN logits, a hang, a switch of array type) on the calls
a plan chooses.

Nothing here is part of the library: these are the faulty backends a user may bring.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from backends.reference import ReferenceModel
from ssd_core import LatencyModel

#: A fault plan: (method, call number of that method, 1-based) -> action or None.
#: Actions: "raise", "nan", "hang", "torch" (return a torch tensor), "fail_second"
#: (open/fork: the second handle of a batch fails; see :class:`Probe`).
Plan = Callable[[str, int], "str | None"]


class InjectedFault(RuntimeError):
    """What an injected "raise" fault raises (a backend's own exception)."""


class Probe:
    """Wraps a :class:`ReferenceModel`; records, checks and injects.

    * ``closes`` counts ``close`` calls per handle; ``double_closes`` lists handles
      closed more than once.
    * ``overlaps`` counts calls that started while another call on this object was
      running (the core promises one call at a time per model).
    * ``closed_during_call`` counts closes of a handle while a call that uses that
      handle was still running.
    * ``hang`` blocks a call on ``release`` (an Event) until the test sets it, or for
      ``hang_s`` seconds, whichever comes first; ``hanging`` is set while it blocks.
    """

    tokenizer = None

    def __init__(
        self,
        inner: ReferenceModel,
        *,
        plan: Plan | None = None,
        hang_s: float = 10.0,
        name: str | None = None,
    ) -> None:
        self.inner = inner
        self.name = name or inner.name
        self.vocab_size = inner.vocab_size
        self.context_size = inner.context_size
        self.latency: LatencyModel | None = inner.latency
        self.plan = plan
        self.hang_s = hang_s
        self.release = threading.Event()
        self.hanging = threading.Event()
        self.calls: Counter[str] = Counter()
        self.closes: Counter[Any] = Counter()
        self.faults: Counter[str] = Counter()
        self.overlaps = 0
        self.closed_during_call = 0
        self.extend_rows = 0
        self._guard = threading.Lock()
        self._inside: list[tuple[Any, ...]] = []  # handles each running call uses

    # -- bookkeeping --------------------------------------------------------------------

    @property
    def open_handles(self) -> int:
        return self.inner.open_handles

    @property
    def double_closes(self) -> list[Any]:
        return [h for h, n in self.closes.items() if n > 1]

    def _enter(self, method: str, handles: Sequence[Any]) -> str | None:
        with self._guard:
            if self._inside:
                self.overlaps += 1
            self._inside.append(tuple(handles))
            self.calls[method] += 1
            n = self.calls[method]
        action = self.plan(method, n) if self.plan is not None else None
        if action is not None:
            self.faults[action] += 1
        return action

    def _leave(self) -> None:
        with self._guard:
            self._inside.pop()

    def _hang(self) -> None:
        self.hanging.set()
        try:
            self.release.wait(self.hang_s)
        finally:
            self.hanging.clear()

    def _logits(self, out: np.ndarray, action: str | None) -> Any:
        if action == "nan":
            out = np.array(out)
            out[0, 0] = np.nan
        elif action == "torch":
            import torch

            return torch.from_numpy(np.array(out))
        return out

    # -- the Model protocol -------------------------------------------------------------

    def open(self, tokens: Sequence[int]) -> Any:
        action = self._enter("open", ())
        try:
            if action == "hang":
                self._hang()
            if action == "raise":
                raise InjectedFault(f"{self.name}: open failed (injected)")
            return self.inner.open(tokens)
        finally:
            self._leave()

    def extend(self, requests: Sequence[tuple[Any, Sequence[int]]]) -> Any:
        action = self._enter("extend", [h for h, _ in requests])
        try:
            if action == "hang":
                self._hang()
            if action == "raise":
                raise InjectedFault(f"{self.name}: extend failed (injected)")
            out = self.inner.extend(requests)
            self.extend_rows += len(out)
            return self._logits(out, action)
        finally:
            self._leave()

    def fork(self, handle: Any, length: int) -> Any:
        action = self._enter("fork", [handle])
        try:
            if action == "hang":
                self._hang()
            if action == "raise":
                raise InjectedFault(f"{self.name}: fork failed (injected)")
            return self.inner.fork(handle, length)
        finally:
            self._leave()

    def truncate(self, handle: Any, length: int) -> None:
        self._enter("truncate", [handle])
        try:
            self.inner.truncate(handle, length)
        finally:
            self._leave()

    def close(self, handle: Any) -> None:
        with self._guard:
            if any(handle in hs for hs in self._inside):
                self.closed_during_call += 1
            self.closes[handle] += 1
            self.calls["close"] += 1
            n = self.calls["close"]
        if self.plan is not None and self.plan("close", n) == "raise":
            self.faults["raise"] += 1
            raise InjectedFault(f"{self.name}: close of {handle!r} failed (injected)")
        self.inner.close(handle)


def every(method: str, action: str, *, at: Sequence[int]) -> Plan:
    """A plan: ``action`` on the listed calls of ``method``."""
    chosen = set(at)

    def plan(m: str, n: int) -> str | None:
        return action if m == method and n in chosen else None

    return plan


def models(
    vocab: int = 16, seed: int = 1, *, context: int | None = None, draft_context: int | None = None
) -> tuple[ReferenceModel, ReferenceModel]:
    """A target and a perturbed draft (reference models)."""
    target = ReferenceModel.random(
        vocab_size=vocab, order=2, seed=seed, peakedness=2.0, context_size=context
    )
    draft = ReferenceModel.perturbed(target, divergence=0.5, seed=seed + 100)
    if draft_context is not None:
        draft = ReferenceModel(
            draft._raw_fn,
            vocab_size=vocab,
            order=draft.order,
            name=draft.name,
            context_size=draft_context,
        )
    return target, draft


def engine_threads() -> list[threading.Thread]:
    """Threads the engine started (they are named ``ssd-...``) that are still alive."""
    return [t for t in threading.enumerate() if t.name.startswith("ssd-") and t.is_alive()]


def wait_until(cond: Callable[[], bool], limit: float = 20.0) -> bool:
    """Poll ``cond`` until it holds (a guard against a hang, not a timing assertion)."""
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
