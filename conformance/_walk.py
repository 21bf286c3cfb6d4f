"""A stateful random walk over open/extend/fork/truncate/close, checked at every step.

In the spirit of Hypothesis's ``RuleBasedStateMachine``: a plan of operations is drawn
from a seed against an abstract model of the handles (just their token lists), then
executed against a fresh real model. Every returned row is compared with the logits a
brand-new handle gives for the same tokens. On a failure the plan is shrunk greedily
(operations are dropped while the failure persists, each replay on a fresh model) so
the message shows a short sequence of operations that reproduces it.

No Hypothesis engine is used: the walk must run without pytest, stay inside a fixed
time budget, and replay exactly from ``(seed, run)``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import attrs
import numpy as np

from ssd_core import HandleError, Model

from ._probe import Fault, Probe, free_model
from ._settings import Settings

__all__ = ["Op", "plan_walk", "run_walk"]

MAX_LIVE = 8


@attrs.frozen(kw_only=True)
class Op:
    """One operation of a walk; handles are named by slot (the n-th handle made).

    Attributes:
        kind: ``open``, ``extend``, ``fork``, ``truncate``, ``close`` or ``use_closed``.
        slot: the handle operated on (``fork``: the parent).
        length: ``fork``/``truncate`` length.
        tokens: ``open`` prompt.
        batch: ``extend`` requests as ``(slot, tokens)``.
    """

    kind: str
    slot: int = -1
    length: int = 0
    tokens: tuple[int, ...] = ()
    batch: tuple[tuple[int, tuple[int, ...]], ...] = ()

    def describe(self) -> str:
        """Readable one-liner, e.g. ``h3 = fork(h1, 2)``."""
        if self.kind == "open":
            return f"open({list(self.tokens)})"
        if self.kind == "extend":
            return "extend([" + ", ".join(f"(h{s}, {list(t)})" for s, t in self.batch) + "])"
        if self.kind == "fork":
            return f"fork(h{self.slot}, {self.length})"
        if self.kind == "truncate":
            return f"truncate(h{self.slot}, {self.length})"
        if self.kind == "use_closed":
            return f"extend([(h{self.slot}, [0])]) on a closed handle -> HandleError"
        return f"close(h{self.slot})"


def plan_walk(rng: np.random.Generator, steps: int, vocab: int, room: int | None) -> list[Op]:
    """Draw ``steps`` valid operations against an abstract model of the handles.

    Args:
        rng: the walk's random generator.
        steps: number of operations.
        vocab: vocabulary size (token ids are drawn from it).
        room: context size, or ``None``.

    Returns:
        The plan; each op is valid in the state the previous ops leave.
    """
    cap = room if room is not None else 1 << 30
    state: list[list[int]] = []  # tokens per slot
    shut: set[int] = set()  # closed slots
    ops: list[Op] = []

    def toks(n: int) -> tuple[int, ...]:
        return tuple(int(t) for t in rng.integers(0, vocab, size=n))

    while len(ops) < steps:
        live = [i for i in range(len(state)) if i not in shut]
        r = rng.random()
        if not live or (r < 0.15 and len(live) < MAX_LIVE):
            prompt = toks(int(rng.integers(0, min(6, cap) + 1)))
            state.append(list(prompt))
            ops.append(Op(kind="open", tokens=prompt))
        elif r < 0.55:
            chosen = rng.permutation(live)[: int(rng.integers(1, 4))]
            batch = []
            for s in (int(c) for c in chosen):
                free = cap - len(state[s])
                if free >= 1:
                    new = toks(int(rng.integers(1, min(4, free) + 1)))
                    state[s].extend(new)
                    batch.append((s, new))
            if batch:
                ops.append(Op(kind="extend", batch=tuple(batch)))
        elif r < 0.70 and len(live) < MAX_LIVE:
            s = int(rng.choice(live))
            n = int(rng.integers(0, len(state[s]) + 1))
            state.append(state[s][:n])
            ops.append(Op(kind="fork", slot=s, length=n))
        elif r < 0.85:
            s = int(rng.choice(live))
            n = int(rng.integers(0, len(state[s]) + 1))
            del state[s][n:]
            ops.append(Op(kind="truncate", slot=s, length=n))
        elif r < 0.95 or not shut:
            s = int(rng.choice(live))
            shut.add(s)
            ops.append(Op(kind="close", slot=s))
        else:
            ops.append(Op(kind="use_closed", slot=int(rng.choice(sorted(shut)))))
    return ops


def _execute(p: Probe, ops: Sequence[Op], room: int | None, log: list[str]) -> int:
    """Run a plan, skipping ops made invalid by shrinking. Returns the number executed.

    Each executed op is appended to ``log`` as ``step i: ...`` text.

    Raises:
        Fault: a row differed from a fresh handle's, or the model misbehaved; the
            message starts with the step.
    """
    cap = room if room is not None else 1 << 30
    handles: list[object] = []
    state: list[list[int]] = []
    shut: set[int] = set()
    done = 0
    tol = max(p.tolerance, p.batch_tolerance)
    for i, op in enumerate(ops):
        exists = 0 <= op.slot < len(state)
        if op.kind == "open":
            log.append(f"step {i}: h{len(state)} = {op.describe()}")
            handles.append(p.open(op.tokens, log[-1]))
            state.append(list(op.tokens))
        elif op.kind == "extend":
            batch = [
                (s, t)
                for s, t in op.batch
                if s < len(state) and s not in shut and len(state[s]) + len(t) <= cap
            ]
            if not batch:
                continue
            what = f"step {i}: " + Op(kind="extend", batch=tuple(batch)).describe()
            log.append(what)
            out = p.extend([(handles[s], t) for s, t in batch], what)
            p.compare_batch(
                out,
                [p.fresh_block(state[s], t) for s, t in batch],
                what,
                labels=[f"request h{s}" for s, _ in batch],
                context_lens=[len(state[s]) for s, _ in batch],
                tolerance=tol,
                against="a fresh handle holding the request's tokens",
            )
            for s, t in batch:
                state[s].extend(t)
        elif not exists or (op.kind == "use_closed") != (op.slot in shut):
            continue  # made invalid by shrinking
        elif op.kind == "fork":
            n = min(op.length, len(state[op.slot]))
            what = f"step {i}: h{len(state)} = fork(h{op.slot}, {n})"
            log.append(what)
            handles.append(p.fork(handles[op.slot], n, what))
            state.append(state[op.slot][:n])
        elif op.kind == "truncate":
            n = min(op.length, len(state[op.slot]))
            log.append(f"step {i}: truncate(h{op.slot}, {n})")
            p.truncate(handles[op.slot], n, log[-1])
            del state[op.slot][n:]
        elif op.kind == "close":
            log.append(f"step {i}: close(h{op.slot})")
            p.close(handles[op.slot], log[-1])
            shut.add(op.slot)
        else:  # use_closed
            h = handles[op.slot]
            log.append(f"step {i}: extend([(h{op.slot}, [0])]) of closed h{op.slot}")
            p.expect_raise(HandleError, functools.partial(p.model.extend, [(h, [0])]), log[-1])
        done += 1
    return done


def _fails(
    make_model: Callable[[], Model], ops: Sequence[Op], p0: Probe
) -> tuple[str, list[str]] | None:
    """Replay ``ops`` on a fresh model: ``(message, log)`` if it fails, else None."""
    model = make_model()
    p = Probe(model, tolerance=p0.tolerance, batch_tolerance=p0.batch_tolerance, rng=p0.rng)
    log: list[str] = []
    try:
        _execute(p, ops, model.context_size, log)
    except Fault as exc:
        return str(exc), log
    except Exception as exc:  # an unexpected exception is a failure too
        return f"{p.step}: raised {type(exc).__name__}: {exc}", log
    finally:
        p.cleanup()
        free_model(model)
    return None


def _shrink(make_model: Callable[[], Model], ops: list[Op], p0: Probe, budget_s: float) -> list[Op]:
    """Greedily drop ops while the plan still fails (bounded by ``budget_s`` seconds)."""
    deadline = time.monotonic() + budget_s
    i = len(ops) - 1
    while i >= 0 and time.monotonic() < deadline:
        candidate = ops[:i] + ops[i + 1 :]
        if _fails(make_model, candidate, p0) is not None:
            ops = candidate
        i -= 1
    return ops


def run_walk(make_model: Callable[[], Model], p: Probe, s: Settings) -> str:
    """The ``stateful_walk`` check: ``s.runs`` walks of ``s.steps`` operations each.

    The first walk runs on the probe's model; later ones on fresh models.

    Raises:
        Fault: with the shrunk sequence of operations that reproduces the failure.
    """
    total = 0
    for run in range(s.runs):
        rng = np.random.default_rng([s.seed, run, 0x5EED])
        ops = plan_walk(rng, s.steps, p.vocab, p.model.context_size)
        probe = (
            p
            if run == 0
            else Probe(
                make_model(), tolerance=p.tolerance, batch_tolerance=p.batch_tolerance, rng=p.rng
            )
        )
        log: list[str] = []
        try:
            total += _execute(probe, ops, probe.model.context_size, log)
        except Exception as exc:
            first = (
                str(exc)
                if isinstance(exc, Fault)
                else (f"{probe.step}: raised {type(exc).__name__}: {exc}")
            )
            probe.cleanup()
            failing = ops[: _index_of(first, len(ops)) + 1]
            short = _shrink(make_model, failing, p, budget_s=20.0 if s.quick else 120.0)
            final, final_log = _fails(make_model, short, p) or (first, log)
            listing = "\n".join(f"      {line}" for line in final_log[-15:])
            more = f" (last 15 of {len(final_log)})" if len(final_log) > 15 else ""
            raise Fault(
                f"random walk {run} (seed {s.seed}) failed; shrunk from {len(failing)} to "
                f"{len(final_log)} operations{more}:\n{listing}\n    -> {final}"
            ) from exc
        finally:
            if probe is not p:  # the first walk's model belongs to the runner
                probe.cleanup()
                free_model(probe.model)
        p.max_diff = max(p.max_diff, probe.max_diff)
    return f"{total} ops, max|diff| {p.max_diff:.3g}"


def _index_of(message: str, n: int) -> int:
    """The step number a failure message starts with (``step 12: ...``), else the last."""
    if message.startswith("step "):
        head = message[5:].split(":", 1)[0]
        if head.isdigit():
            return min(int(head), n - 1)
    return n - 1
