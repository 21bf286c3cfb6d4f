"""The random walk as a Hypothesis ``RuleBasedStateMachine``, for authors who use Hypothesis.

:func:`check_model`'s ``stateful_walk`` is a seeded walk with its own shrinker, so the
suite runs without Hypothesis or pytest. Backend authors who already use Hypothesis
can get the same rules driven by Hypothesis's engine (coverage-guided choices, its
shrinker, its example database) with::

    from conformance import model_state_machine

    TestMyBackendStateful = model_state_machine(make_model).TestCase

Hypothesis is imported only when this function is called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ssd_core import HandleError, Model

from ._probe import Probe, free_model
from ._runner import _auto_tolerance

__all__ = ["model_state_machine"]


def model_state_machine(
    make_model: Callable[[], Model],
    *,
    tolerance: float | None = None,
    batch_tolerance: float | None = None,
    max_live: int = 8,
) -> Any:
    """Build a Hypothesis state machine class that walks a fresh model per example.

    Rules: open, extend (a batch of up to 3 live handles), fork, truncate, close, and
    extend of a closed handle (must raise HandleError). Every returned row is compared
    with a brand-new handle holding the same tokens; teardown closes every handle.

    Args:
        make_model: zero-argument factory returning a fresh model.
        tolerance: absolute logits tolerance; ``None``: chosen from the logits dtype.
        batch_tolerance: tolerance for rows scored in batches; ``None``: ``tolerance``.
        max_live: most handles open at once.

    Returns:
        A ``hypothesis.stateful.RuleBasedStateMachine`` subclass; use its
        ``.TestCase`` in a test module or pass it to ``run_state_machine_as_test``.

    Raises:
        ImportError: Hypothesis is not installed.
    """
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

    tol = tolerance if tolerance is not None else _auto_tolerance(make_model)
    btol = batch_tolerance if batch_tolerance is not None else tol

    class ModelStateMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            model = make_model()
            self.p = Probe(model, tolerance=tol, batch_tolerance=btol, rng=np.random.default_rng(0))
            self.cap = model.context_size if model.context_size is not None else 1 << 30
            self.vocab = self.p.vocab
            self.handles: list[Any] = []
            self.tokens: list[list[int]] = []
            self.shut: set[int] = set()

        def live(self) -> list[int]:
            return [i for i in range(len(self.handles)) if i not in self.shut]

        def _toks(self, data: Any, lo: int, hi: int) -> list[int]:
            ids = st.integers(0, self.vocab - 1)
            return list(data.draw(st.lists(ids, min_size=lo, max_size=hi)))

        @precondition(lambda self: len(self.live()) < max_live)
        @rule(data=st.data())
        def open(self, data: Any) -> None:
            prompt = self._toks(data, 0, min(6, self.cap))
            self.handles.append(self.p.open(prompt, f"h{len(self.handles)} = open({prompt})"))
            self.tokens.append(prompt)

        @precondition(lambda self: bool(self.live()))
        @rule(data=st.data())
        def extend(self, data: Any) -> None:
            live = [s for s in self.live() if len(self.tokens[s]) < self.cap]
            if not live:
                return
            chosen = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=3, unique=True))
            batch = [
                (s, self._toks(data, 1, min(4, self.cap - len(self.tokens[s])))) for s in chosen
            ]
            what = "extend([" + ", ".join(f"(h{s}, {t})" for s, t in batch) + "])"
            out = self.p.extend([(self.handles[s], t) for s, t in batch], what)
            self.p.compare_batch(
                out,
                [self.p.fresh_block(self.tokens[s], t) for s, t in batch],
                what,
                labels=[f"h{s}" for s, _ in batch],
                context_lens=[len(self.tokens[s]) for s, _ in batch],
                tolerance=max(tol, btol),
            )
            for s, t in batch:
                self.tokens[s].extend(t)

        @precondition(lambda self: bool(self.live()) and len(self.live()) < max_live)
        @rule(data=st.data())
        def fork(self, data: Any) -> None:
            s = data.draw(st.sampled_from(self.live()))
            n = data.draw(st.integers(0, len(self.tokens[s])))
            what = f"h{len(self.handles)} = fork(h{s}, {n})"
            self.handles.append(self.p.fork(self.handles[s], n, what))
            self.tokens.append(self.tokens[s][:n])

        @precondition(lambda self: bool(self.live()))
        @rule(data=st.data())
        def truncate(self, data: Any) -> None:
            s = data.draw(st.sampled_from(self.live()))
            n = data.draw(st.integers(0, len(self.tokens[s])))
            self.p.truncate(self.handles[s], n, f"truncate(h{s}, {n})")
            del self.tokens[s][n:]

        @precondition(lambda self: bool(self.live()))
        @rule(data=st.data())
        def close(self, data: Any) -> None:
            s = data.draw(st.sampled_from(self.live()))
            self.p.close(self.handles[s], f"close(h{s})")
            self.shut.add(s)

        @precondition(lambda self: bool(self.shut))
        @rule(data=st.data())
        def use_closed(self, data: Any) -> None:
            s = data.draw(st.sampled_from(sorted(self.shut)))
            h = self.handles[s]
            self.p.expect_raise(
                HandleError, lambda: self.p.model.extend([(h, [0])]), f"extend of closed h{s}"
            )

        @invariant()
        def within_context(self) -> None:
            for s in self.live():
                if len(self.tokens[s]) > self.cap:
                    raise AssertionError(f"h{s} holds more than context_size tokens")

        def teardown(self) -> None:
            problems = self.p.cleanup()
            problems += [line for line in [free_model(self.p.model)] if line]
            if problems:
                raise AssertionError("; ".join(problems))

    ModelStateMachine.__name__ = ModelStateMachine.__qualname__ = "ModelStateMachine"
    return ModelStateMachine
