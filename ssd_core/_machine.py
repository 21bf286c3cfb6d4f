"""The Saguaro state machine (sans-I/O).

Theory of operation
===================

The machine generates tokens for a batch of sequences in *rounds*. In every round each
live sequence has a *speculation* -- K draft tokens with the proposal rows q they were
sampled from (K = 0 in AR mode) -- and the target verifies all of them in one batched
pass: token ``d_i`` is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))``; at the
first rejection a recovery token is drawn from ``max(0, p_i - q_i)`` renormalised, and
if all are accepted a bonus token is drawn from ``p_{K+1}``. This is exact for *any*
proposal, which is why everything else here is free to be clever.

Where the next speculation comes from is what the modes differ in:

* ``ar``  -- none: K = 0, the target alone, one token per pass.
* ``sd``  -- the draft drafts K tokens (a DRAFTING phase), then the target verifies.
* ``ssd`` -- while the target verifies, the draft runs a *tree job*: a glue pass over
  the speculation being verified (rows g_0..g_K), the top-F_k candidates of g_k for
  every possible outcome "k accepted, then token t" (the rejected d_{k+1} excluded),
  one forked branch per candidate, and K tree-decode steps per branch. The results
  fill a speculation cache keyed by (sequence, k, t). When the verification ends the
  outcome is looked up: a *hit* is the next speculation, ready at once; a *miss* goes
  to a fallback -- ``neural`` (just-in-time drafting: a DRAFTING phase) or ``fast``
  (n-gram backup tokens, proposed as point masses).

The machine never calls a model. It keeps a queue of *jobs* per lane (target, draft);
a job emits one request at a time (:mod:`ssd_core._events`) and consumes its result. A
driver asks :meth:`Machine.next_request` for each lane and hands results back through
:meth:`Machine.deliver`, in whatever order they complete. The round-level phase
changes only through :data:`TRANSITIONS`, the one table of the machine's transitions.

Every random draw is named by (purpose, sequence, round, ...) and the seeded source
derives it from the seed and the name alone, so results do not depend on the order in
which a driver completes requests. When a verification finishes before the tree, the
tree is *pruned* to the branch that can still be used; that changes the work done,
never a token.

Any exception inside the machine moves it to ERROR; later calls raise MachineError.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from ._config import SamplingParams, SSDConfig
from ._errors import InternalError, MachineError
from ._events import Close, Extend, Fork, Lane, Open, Request
from ._fanout import OutcomeStats
from ._math import (
    accept_probabilities,
    check_logits,
    count_above,
    draft_weights,
    move_like,
    namespace,
    residual_weights,
    target_probs,
    top_ids,
)
from ._metrics import Metrics, MetricsRecorder
from ._protocol import Handle
from ._random import Key, RandomSource

__all__ = ["TRANSITIONS", "Machine", "Phase", "Speculation"]


class Phase(enum.Enum):
    OPENING = "opening"  # prefilling the prompts on both lanes
    DRAFTING = (
        "drafting"  # the draft proposes K tokens just in time (sd, first round, neural fallback)
    )
    VERIFYING = "verifying"  # the target verifies; in ssd the draft fills the cache meanwhile
    CLOSING = "closing"  # every sequence finished; handles are being released
    DONE = "done"
    ERROR = "error"


class Event(enum.Enum):
    NEED_DRAFT = "need_draft"  # some live sequence has no speculation yet
    READY = "ready"  # every live sequence has a speculation
    ALL_FINISHED = "all_finished"
    CLOSED = "closed"


#: (phase, event) -> next phase. Every phase change goes through this table.
TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.OPENING, Event.NEED_DRAFT): Phase.DRAFTING,
    (Phase.OPENING, Event.READY): Phase.VERIFYING,
    (Phase.OPENING, Event.ALL_FINISHED): Phase.CLOSING,
    (Phase.DRAFTING, Event.READY): Phase.VERIFYING,
    (Phase.VERIFYING, Event.NEED_DRAFT): Phase.DRAFTING,
    (Phase.VERIFYING, Event.READY): Phase.VERIFYING,
    (Phase.VERIFYING, Event.ALL_FINISHED): Phase.CLOSING,
    (Phase.CLOSING, Event.CLOSED): Phase.DONE,
}


@attrs.define
class Speculation:
    """Draft tokens and the proposal weights (rows, any namespace) they were drawn from.

    ``source`` is ``"cache"`` (a hit: the primary speculator), ``"neural"`` (drafted
    just in time) or ``"fast"`` (n-gram backup tokens: point masses, ``q`` is ``None``
    and the verifier uses one-hot rows).
    """

    tokens: tuple[int, ...]
    q: Any
    source: str


@attrs.define
class Outcome:
    accepted: int
    token: int
    proposed: int


@attrs.define(eq=False)
class _Seq:
    index: int
    prompt_len: int
    tokens: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    max_new: int
    done: bool = False
    finish_reason: str | None = None
    spec: Speculation | None = None
    t_handle: Handle = None
    t_held: list[int] = attrs.field(factory=list)
    d_handle: Handle = None
    d_held: list[int] = attrs.field(factory=list)
    #: Raw draft logits rows already computed for the draft handle, by the position of
    #: the token that was fed (row p predicts token p + 1).
    d_rows: dict[int, Any] = attrs.field(factory=dict)
    rounds: int = 0

    def plan_draft(
        self, desired: list[int], first_needed: int
    ) -> tuple[int | None, tuple[int, ...], int]:
        """Bring the draft handle to ``desired`` so that rows from ``first_needed`` on are
        known, reusing remembered rows: (truncate-to or None, tokens to feed, first fed
        position). The handle is recorded as holding ``desired`` from now on."""
        keep = min(_common_prefix(self.d_held, desired), len(desired) - 1)
        if any(p not in self.d_rows for p in range(first_needed, keep)):
            keep = min(keep, first_needed)
        truncate = keep if keep < len(self.d_held) else None
        self.d_rows = {p: r for p, r in self.d_rows.items() if first_needed <= p < keep}
        self.d_held = list(desired)
        return truncate, tuple(desired[keep:]), keep

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _sync(
    held: list[int], desired: list[int], first_needed: int
) -> tuple[int | None, tuple[int, ...]]:
    """How to bring a handle holding ``held`` to ``desired`` while scoring every
    position from ``first_needed`` on: (truncate-to or None, tokens to feed)."""
    keep = min(_common_prefix(held, desired), first_needed)
    return (keep if keep < len(held) else None), tuple(desired[keep:])


def fast_backup_tokens(context: Sequence[int], k: int, max_n: int = 3) -> tuple[int, ...]:
    """Cheap backup tokens: prompt lookup of the longest recent n-gram, else repetition.

    A deterministic function of the context, so it is a point-mass proposal.
    """
    ctx = list(context)
    for n in range(min(max_n, len(ctx) - 1), 0, -1):
        tail = ctx[-n:]
        for start in range(len(ctx) - n - 1, -1, -1):
            if ctx[start : start + n] == tail:
                follow = ctx[start + n : start + n + k]
                return tuple(follow + [follow[-1]] * (k - len(follow)))
    return (ctx[-1],) * k


# -- jobs: one lane's work, one request at a time ------------------------------------


class _Job:
    lane: Lane
    done: bool = False
    busy_s: float = 0.0

    def next(self, rid: int) -> Request | None:
        raise NotImplementedError

    def receive(self, request: Request, result: Any) -> None:
        raise NotImplementedError


class _OpenJob(_Job):
    def __init__(self, machine: Machine, lane: Lane) -> None:
        self.m = machine
        self.lane = lane
        self.sent = False

    def next(self, rid: int) -> Request | None:
        if self.sent:
            return None
        self.sent = True
        prompts = tuple(tuple(s.tokens[:-1]) for s in self.m.seqs)
        return Open(id=rid, lane=self.lane, prompts=prompts)

    def receive(self, request: Request, result: Any) -> None:
        handles = tuple(result)
        if len(handles) != len(self.m.seqs):
            self.m.contract(
                self.lane, f"open returned {len(handles)} handles for {len(self.m.seqs)} prompts"
            )
        for s, h in zip(self.m.seqs, handles):
            if self.lane is Lane.TARGET:
                s.t_handle, s.t_held = h, list(s.tokens[:-1])
            else:
                s.d_handle, s.d_held = h, list(s.tokens[:-1])
        self.done = True


class _CloseJob(_Job):
    def __init__(self, lane: Lane, handles: list[Handle]) -> None:
        self.lane = lane
        self.handles = tuple(handles)
        self.sent = False
        self.done = not handles

    def next(self, rid: int) -> Request | None:
        if self.sent or self.done:
            return None
        self.sent = True
        return Close(id=rid, lane=self.lane, handles=self.handles)

    def receive(self, request: Request, result: Any) -> None:
        self.done = True


class _VerifyJob(_Job):
    """One batched target pass over every live sequence's speculation, then the
    rejection-sampling verification of each."""

    lane = Lane.TARGET

    def __init__(self, machine: Machine, seqs: list[_Seq]) -> None:
        self.m = machine
        self.seqs = seqs
        self.sent = False
        self.outcomes: dict[int, Outcome] = {}

    def next(self, rid: int) -> Request | None:
        if self.sent:
            return None
        self.sent = True
        items = []
        for s in self.seqs:
            desired = s.tokens + list(s.spec.tokens)  # type: ignore[union-attr]
            keep, feed = _sync(s.t_held, desired, len(s.tokens) - 1)
            items.append((s.t_handle, keep, feed))
            s.t_held = desired
        self.request = Extend(id=rid, lane=Lane.TARGET, items=tuple(items), purpose="verify")
        return self.request

    def receive(self, request: Request, result: Any) -> None:
        m = self.m
        assert isinstance(request, Extend)
        logits = check_logits(
            result, request.rows, m.vocab_size, who=m.target_name, what="verification"
        )
        xp = namespace(logits)
        # Gather each sequence's K_i + 1 needed rows into one block.
        picks: list[int] = []
        params: list[SamplingParams] = []
        offset = 0
        for s, (_, _, feed) in zip(self.seqs, request.items):
            n = len(s.spec.tokens) + 1  # type: ignore[union-attr]
            start = offset + len(feed) - n
            picks.extend(range(start, start + n))
            params.extend([s.params] * n)
            offset += len(feed)
        rows = xp.take(logits, xp.asarray(picks, device=_device(logits)), axis=0)
        p = target_probs(rows, params)

        # Acceptance tests, one position at a time so a rejection ends the draws.
        starts, at = [], 0
        q_rows = []
        for s in self.seqs:
            starts.append(at)
            k = len(s.spec.tokens)  # type: ignore[union-attr]
            at += k + 1
            if k and s.spec.q is None:  # type: ignore[union-attr]
                # Point masses (fast backup tokens): one-hot rows, built where p lives.
                cols = xp.arange(m.vocab_size, device=_device(p))
                toks = xp.asarray(list(s.spec.tokens), device=_device(p))  # type: ignore[union-attr]
                q_rows.append(xp.astype(cols[None, :] == toks[:, None], xp.float64))
            elif k:
                q_rows.append(move_like(s.spec.q, p))  # type: ignore[union-attr]
        accept_p: list[list[float]] = []
        for s, st, q in zip(self.seqs, starts, _iter_q(self.seqs, q_rows)):
            toks = s.spec.tokens  # type: ignore[union-attr]
            accept_p.append(accept_probabilities(p[st : st + len(toks)], q, toks) if toks else [])
        accepted = [0] * len(self.seqs)
        running = [i for i, s in enumerate(self.seqs) if s.spec.tokens]  # type: ignore[union-attr]
        pos = 0
        while running:
            keys: list[Key] = [
                ("accept", self.seqs[i].index, self.seqs[i].rounds, pos) for i in running
            ]
            draws = m.source.bernoulli(keys, [accept_p[i][pos] for i in running])
            still = []
            for i, ok in zip(running, draws):
                if ok:
                    accepted[i] += 1
                    if accepted[i] < len(self.seqs[i].spec.tokens):  # type: ignore[union-attr]
                        still.append(i)
            running = still
            pos += 1

        # One recovery (residual) or bonus draw per sequence, batched.
        last_rows = []
        for i, (s, st, q) in enumerate(zip(self.seqs, starts, _iter_q(self.seqs, q_rows))):
            a = accepted[i]
            if a < len(s.spec.tokens):  # type: ignore[union-attr]
                last_rows.append(residual_weights(p[st + a], q[a]))
            else:
                last_rows.append(p[st + a])
        token_keys: list[Key] = [("token", s.index, s.rounds) for s in self.seqs]
        tokens = m.source.categorical(token_keys, xp.stack(last_rows))
        for i, s in enumerate(self.seqs):
            self.outcomes[s.index] = Outcome(
                accepted=accepted[i],
                token=tokens[i],
                proposed=len(s.spec.tokens),  # type: ignore[union-attr]
            )
        self.done = True


def _iter_q(seqs: list[_Seq], q_rows: list[Any]) -> list[Any]:
    """q rows aligned with ``seqs`` (``None`` for sequences with an empty speculation)."""
    out, it = [], iter(q_rows)
    for s in seqs:
        out.append(next(it) if s.spec.tokens else None)  # type: ignore[union-attr]
    return out


def _device(x: Any) -> Any:
    import array_api_compat

    return array_api_compat.device(x)


class _DraftJob(_Job):
    """Draft K tokens for some sequences, one batched draft pass per token."""

    lane = Lane.DRAFT

    def __init__(self, machine: Machine, seqs: list[_Seq], source: str) -> None:
        self.m = machine
        self.seqs = seqs
        self.source = source
        self.step = 0
        self.in_flight = False
        self.tokens: dict[int, list[int]] = {s.index: [] for s in seqs}
        self.rows: dict[int, list[Any]] = {s.index: [] for s in seqs}
        self.done = not seqs

    def next(self, rid: int) -> Request | None:
        if self.done or self.in_flight:
            return None
        self.in_flight = True
        items = []
        self.fed_from = []
        for s in self.seqs:
            if self.step == 0:
                keep, feed, start = s.plan_draft(s.tokens, len(s.tokens) - 1)
            else:
                keep, feed, start = None, (self.tokens[s.index][-1],), len(s.d_held)
                s.d_held.append(feed[0])
            self.fed_from.append(start)
            items.append((s.d_handle, keep, feed))
        return Extend(id=rid, lane=Lane.DRAFT, items=tuple(items), purpose=f"draft:{self.source}")

    def receive(self, request: Request, result: Any) -> None:
        m = self.m
        assert isinstance(request, Extend)
        logits = check_logits(result, request.rows, m.vocab_size, who=m.draft_name, what="drafting")
        xp = namespace(logits)
        last, offset = [], 0
        for s, start, (_, _, feed) in zip(self.seqs, self.fed_from, request.items):
            for j in range(len(feed)):
                s.d_rows[start + j] = logits[offset + j]
            offset += len(feed)
            last.append(offset - 1)
        rows = xp.take(logits, xp.asarray(last, device=_device(logits)), axis=0)
        fan = m.saguaro_fanout(backup=True)[self.step]
        w = draft_weights(
            rows,
            [s.params.effective_draft_temperature for s in self.seqs],
            [fan] * len(self.seqs),
            m.saguaro_c,
        )
        keys = [(self.source, s.index, s.rounds, self.step) for s in self.seqs]
        drawn = m.source.categorical(keys, w)
        for i, s in enumerate(self.seqs):
            self.tokens[s.index].append(drawn[i])
            self.rows[s.index].append(w[i])
        self.step += 1
        self.in_flight = False
        if self.step == m.k:
            for s in self.seqs:
                s.spec = Speculation(
                    tokens=tuple(self.tokens[s.index]),
                    q=xp.stack(self.rows[s.index]),
                    source=self.source,
                )
            self.done = True


@attrs.define(eq=False)
class _Branch:
    seq: _Seq
    k: int
    token: int
    #: The tokens the branch handle holds once its first token is fed (parent prefix +
    #: candidate); the sampled tokens follow.
    context: list[int]
    handle: Handle = None
    tokens: list[int] = attrs.field(factory=list)
    rows: list[Any] = attrs.field(factory=list)
    raw: list[Any] = attrs.field(factory=list)
    live: bool = True
    promoted: bool = False


class _TreeJob(_Job):
    """SSD's draft-side work during a verification: glue pass, forks, tree decode."""

    lane = Lane.DRAFT

    def __init__(self, machine: Machine, seqs: list[_Seq]) -> None:
        self.m = machine
        self.seqs = [s for s in seqs if len(s.spec.tokens) == machine.k]  # type: ignore[union-attr]
        self.stage = "glue"
        self.step = 0
        self.in_flight = False
        self.glue: dict[int, Any] = {}
        self.branches: list[_Branch] = []
        self.wanted: dict[int, tuple[int, int]] | None = None  # set once the outcome is known
        self.done = not self.seqs

    # The verification finished first: only the branch matching each outcome matters.
    def prune(self, outcomes: dict[int, Outcome]) -> None:
        self.wanted = {i: (o.accepted, o.token) for i, o in outcomes.items()}
        for b in self.branches:
            if (b.k, b.token) != self.wanted.get(b.seq.index):
                b.live = False
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.stage == "step" and not any(b.live for b in self.branches):
            self.done = True

    def next(self, rid: int) -> Request | None:
        if self.done or self.in_flight:
            return None
        if self.stage == "glue":
            glue: list[tuple[Handle, int | None, tuple[int, ...]]] = []
            self.fed_from = []
            for s in self.seqs:
                desired = s.tokens + list(s.spec.tokens)  # type: ignore[union-attr]
                keep, feed, start = s.plan_draft(desired, len(s.tokens) - 1)
                glue.append((s.d_handle, keep, feed))
                self.fed_from.append(start)
            req: Request = Extend(id=rid, lane=Lane.DRAFT, items=tuple(glue), purpose="glue")
        else:
            self._sent = [b for b in self.branches if b.live]
            if not self._sent:
                self.done = True
                return None
            if self.stage == "fork":
                req = Fork(
                    id=rid,
                    lane=Lane.DRAFT,
                    items=tuple((b.seq.d_handle, len(b.seq.tokens) + b.k) for b in self._sent),
                )
            else:
                items = tuple(
                    (b.handle, None, (b.token if self.step == 0 else b.tokens[-1],))
                    for b in self._sent
                )
                req = Extend(id=rid, lane=Lane.DRAFT, items=items, purpose="tree")
        self.in_flight = True
        return req

    def receive(self, request: Request, result: Any) -> None:
        m = self.m
        self.in_flight = False
        if self.stage == "glue":
            assert isinstance(request, Extend)
            logits = check_logits(
                result, request.rows, m.vocab_size, who=m.draft_name, what="glue pass"
            )
            xp = namespace(logits)
            offset = 0
            for s, start, (_, _, feed) in zip(self.seqs, self.fed_from, request.items):
                for j in range(len(feed)):
                    s.d_rows[start + j] = logits[offset + j]
                offset += len(feed)
                first = len(s.tokens) - 1
                self.glue[s.index] = xp.stack([s.d_rows[p] for p in range(first, first + m.k + 1)])
            self._plan_branches()
            self.stage = "fork"
            if not self.branches:
                self.done = True
        elif self.stage == "fork":
            handles = tuple(result)
            if len(handles) != len(self._sent):
                m.contract(
                    Lane.DRAFT, f"fork returned {len(handles)} handles for {len(self._sent)} forks"
                )
            for b, h in zip(self._sent, handles):
                b.handle = h
            self.branches = [b for b in self.branches if b.handle is not None]
            self.stage = "step"
            self._maybe_finish()
        else:
            assert isinstance(request, Extend)
            live = self._sent
            logits = check_logits(
                result, request.rows, m.vocab_size, who=m.draft_name, what="tree decode"
            )
            fan_next = m.saguaro_fanout(backup=False)
            fan = fan_next[self.step] if self.step < len(fan_next) else 0
            w = draft_weights(
                logits,
                [b.seq.params.effective_draft_temperature for b in live],
                [fan] * len(live),
                m.saguaro_c,
            )
            keys = [("tree", b.seq.index, b.seq.rounds + 1, b.k, b.token, self.step) for b in live]
            drawn = m.source.categorical(keys, w)
            for i, b in enumerate(live):
                b.tokens.append(drawn[i])
                b.rows.append(w[i])
                b.raw.append(logits[i])
            self.step += 1
            if self.step == m.k:
                self.done = True

    def _plan_branches(self) -> None:
        m = self.m
        for s in self.seqs:
            fan = m.fanout_for(s.spec.source)  # type: ignore[union-attr]
            g = self.glue[s.index]
            spec = s.spec.tokens  # type: ignore[union-attr]
            for k in range(m.k + 1):
                if fan[k] <= 0:
                    continue
                exclude = spec[k] if k < m.k else None
                for t in top_ids(g[k], fan[k], exclude=exclude):
                    if self.wanted is not None and self.wanted.get(s.index) != (k, t):
                        continue
                    context = s.tokens + list(spec[:k]) + [t]
                    self.branches.append(_Branch(seq=s, k=k, token=t, context=context))

    def lookup(self, seq: _Seq, outcome: Outcome) -> _Branch | None:
        """The complete cached branch for this outcome, if the cache has one."""
        for b in self.branches:
            if b.seq is seq and b.k == outcome.accepted and b.token == outcome.token:
                if len(b.tokens) != self.m.k:
                    raise InternalError("a cached branch was used before it was complete")
                return b
        return None

    def rank(self, seq: _Seq, outcome: Outcome) -> int | None:
        """1 + how many candidates the draft ranked above the realised token."""
        g = self.glue.get(seq.index)
        if g is None:
            return None
        spec = seq.spec.tokens  # type: ignore[union-attr]
        exclude = spec[outcome.accepted] if outcome.accepted < len(spec) else None
        return count_above(g[outcome.accepted], outcome.token, exclude) + 1

    def handles(self) -> list[Handle]:
        return [b.handle for b in self.branches if b.handle is not None and not b.promoted]


# -- the machine ----------------------------------------------------------------------


class Machine:
    """The Saguaro state machine for one batch of prompts.

    Args:
        prompts: token lists, each non-empty (validated by the caller).
        params: one SamplingParams per prompt.
        mode: ``"ar"``, ``"sd"`` or ``"ssd"``.
        config: the SSD configuration (K, fan-out, C, fallback).
        max_new_tokens: generation budget per sequence.
        vocab_size: shared by target and draft.
        source: the random source.
        target_context / draft_context: the models' context sizes (None = unbounded).
        target_name / draft_name: for error messages.
        eos_ids: default stop ids (the target tokenizer's), used unless a sequence's
            params say otherwise.
    """

    def __init__(
        self,
        *,
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        mode: str,
        config: SSDConfig,
        max_new_tokens: int,
        vocab_size: int,
        source: RandomSource,
        target_context: int | None = None,
        draft_context: int | None = None,
        target_name: str = "target",
        draft_name: str = "draft",
        eos_ids: Sequence[int] = (),
    ) -> None:
        self.mode = mode
        self.config = config
        self.k = config.k if mode != "ar" else 0
        self.vocab_size = vocab_size
        self.source = source
        self.target_context = target_context
        self.draft_context = draft_context
        self.target_name = target_name
        self.draft_name = draft_name
        self.saguaro_c = config.saguaro_c if mode == "ssd" else 1.0
        self.phase = Phase.OPENING
        self.metrics = MetricsRecorder()
        self.stats = {
            "primary": OutcomeStats(config.rank_window),
            "backup": OutcomeStats(config.rank_window),
        }
        self.seqs: list[_Seq] = []
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            if sp.stop_token_ids is not None:
                stops = frozenset(sp.stop_token_ids)
            else:
                stops = frozenset() if sp.ignore_eos else frozenset(eos_ids)
            self.seqs.append(
                _Seq(
                    index=i,
                    prompt_len=len(prompt),
                    tokens=list(prompt),
                    params=sp,
                    stop_ids=stops,
                    max_new=max_new_tokens,
                )
            )
        self._queues: dict[Lane, deque[_Job]] = {Lane.TARGET: deque(), Lane.DRAFT: deque()}
        self._in_flight: dict[Lane, Request | None] = {Lane.TARGET: None, Lane.DRAFT: None}
        self._next_id = 0
        self._verify: _VerifyJob | None = None
        self._tree: _TreeJob | None = None
        self._draft: _DraftJob | None = None
        self._new_tokens: list[tuple[int, list[int]]] = []
        # Auto-fallback measurements (seconds and tokens).
        self._jit_s: list[float] = []
        self._round_s: list[float] = []
        self._tokens_by_source: dict[str, list[int]] = {"neural": [], "fast": []}
        self.error: BaseException | None = None

        for s in self.seqs:
            if (
                max_new_tokens == 0
                or self.target_context is not None
                and len(s.tokens) > self.target_context
            ):
                self._finish(s, "length")
        self._queues[Lane.TARGET].append(_OpenJob(self, Lane.TARGET))
        self._opening = 1
        if mode != "ar":
            self._queues[Lane.DRAFT].append(_OpenJob(self, Lane.DRAFT))
            self._opening = 2

    # -- the driver's interface -------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    def next_request(self, lane: Lane) -> Request | None:
        """The next request for ``lane``, or ``None`` if it has nothing to do right now
        (or already has a request outstanding)."""
        self._check_alive()
        if self._in_flight[lane] is not None:
            return None
        try:
            self._settle()
            queue = self._queues[lane]
            while queue:
                req = queue[0].next(self._next_id)
                if req is not None:
                    self._next_id += 1
                    self._in_flight[lane] = req
                    return req
                if not queue[0].done:
                    return None
                self._settle()
            return None
        except BaseException as exc:
            self.fail(exc)
            raise

    def deliver(self, request: Request, result: Any, elapsed: float = 0.0) -> None:
        """Hand back ``request``'s result; ``elapsed`` is its (real or virtual) duration."""
        self._check_alive()
        lane = request.lane
        if self._in_flight[lane] is not request:
            raise MachineError(
                f"result delivered for a request that is not outstanding: {request!r}"
            )
        self._in_flight[lane] = None
        try:
            job = self._queues[lane][0]
            job.busy_s += elapsed
            if lane is Lane.TARGET:
                self.metrics.target_busy_s += elapsed
            else:
                self.metrics.draft_busy_s += elapsed
            if isinstance(request, Extend):
                if lane is Lane.TARGET:
                    self.metrics.target_passes += 1
                    if request.purpose == "verify":
                        self.metrics.verify_s += elapsed
                        self.metrics.verify_count += 1
                else:
                    self.metrics.draft_passes += 1
                    self.metrics.draft_step_s += elapsed
                    self.metrics.draft_step_count += 1
            job.receive(request, result)
            self._settle()
        except BaseException as exc:
            self.fail(exc)
            raise

    def pop_new_tokens(self) -> list[tuple[int, list[int]]]:
        """(sequence index, tokens) committed since the last call, in commit order."""
        out, self._new_tokens = self._new_tokens, []
        return out

    def fail(self, exc: BaseException) -> None:
        """Move to ERROR (drivers call this when a backend raised)."""
        if self.phase is not Phase.ERROR:
            self.error = exc
            self.phase = Phase.ERROR

    def live_handles(self) -> dict[Lane, list[Handle]]:
        """Every handle the machine still holds, per lane (for cleanup after a failure).
        Handles being closed by an outstanding request are included."""
        out: dict[Lane, list[Handle]] = {Lane.TARGET: [], Lane.DRAFT: []}
        for s in self.seqs:
            if s.t_handle is not None:
                out[Lane.TARGET].append(s.t_handle)
            if s.d_handle is not None:
                out[Lane.DRAFT].append(s.d_handle)
        if self._tree is not None:
            out[Lane.DRAFT].extend(self._tree.handles())
        for lane in Lane:
            for job in self._queues[lane]:
                if isinstance(job, _CloseJob) and not job.done:
                    out[lane].extend(job.handles)
                elif isinstance(job, _TreeJob) and job is not self._tree:
                    out[lane].extend(job.handles())
        for lane in Lane:
            out[lane] = list(dict.fromkeys(out[lane]))
        return out

    @property
    def outputs(self) -> list[list[int]]:
        return [s.generated for s in self.seqs]

    @property
    def finish_reasons(self) -> list[str | None]:
        return [s.finish_reason for s in self.seqs]

    def freeze_metrics(self, *, driver: str, wall_s: float) -> Metrics:
        return self.metrics.freeze(
            mode=self.mode, driver=driver, batch_size=len(self.seqs), wall_s=wall_s
        )

    # -- coordination -----------------------------------------------------------------

    def _check_alive(self) -> None:
        if self.phase is Phase.ERROR:
            raise MachineError(f"the machine failed earlier: {self.error!r}")

    def _goto(self, event: Event) -> None:
        try:
            self.phase = TRANSITIONS[(self.phase, event)]
        except KeyError:
            raise InternalError(f"no transition from {self.phase} on {event}") from None

    def contract(self, lane: Lane, message: str) -> None:
        from ._errors import BackendContractError

        who = self.target_name if lane is Lane.TARGET else self.draft_name
        raise BackendContractError(f"backend {who!r}: {message}")

    def _job_done(self, job: _Job) -> None:
        if isinstance(job, _OpenJob):
            self._opening -= 1
            if self._opening == 0:
                self._after_round()
        elif isinstance(job, _DraftJob):
            self._draft = None
            self._jit_s.append(job.busy_s)
            self._start_round()
        elif isinstance(job, _VerifyJob):
            if self._tree is not None and not self._tree.done:
                self._tree.prune(job.outcomes)
            self._maybe_resolve()
        elif isinstance(job, _TreeJob):
            self._maybe_resolve()

    def _settle(self) -> None:
        """Retire finished jobs at the front of idle lanes; notice when closing is over."""
        for lane in Lane:
            queue = self._queues[lane]
            while queue and queue[0].done and self._in_flight[lane] is None:
                self._job_done(queue.popleft())
        if (
            self.phase is Phase.CLOSING
            and not any(self._queues[lane] for lane in Lane)
            and all(self._in_flight[lane] is None for lane in Lane)
        ):
            self._goto(Event.CLOSED)

    def _live(self) -> list[_Seq]:
        return [s for s in self.seqs if not s.done]

    def _spec_room(self, s: _Seq) -> bool:
        """Is there room in the contexts for a full K-token round?"""
        if self.k == 0:
            return True
        n = len(s.tokens)
        if self.target_context is not None and n + self.k > self.target_context:
            return False
        need_d = n + (2 * self.k if self.mode == "ssd" else self.k)
        return self.draft_context is None or need_d <= self.draft_context

    def _maybe_resolve(self) -> None:
        if self._verify is None or not self._verify.done:
            return
        if self._tree is not None and not self._tree.done:
            return
        self._resolve()

    def _resolve(self) -> None:
        """Both lanes finished the round: commit, then find the next speculations."""
        verify, tree = self._verify, self._tree
        assert verify is not None
        self._verify = self._tree = None
        self.metrics.rounds += 1
        self._round_s.append(max(verify.busy_s, tree.busy_s if tree else 0.0))
        need_draft: list[_Seq] = []
        fast_seqs: list[_Seq] = []
        retired: list[Handle] = []
        for s in verify.seqs:
            o = verify.outcomes[s.index]
            spec = s.spec
            assert spec is not None
            group = "primary" if spec.source == "cache" else "backup"
            m = self.metrics
            m.sequence_rounds += 1
            if o.proposed:
                m.proposed_tokens += o.proposed
                m.accepted_tokens += o.accepted
                m.speculated_rounds += 1
                if spec.source == "cache":
                    m.accepted_on_hit += o.accepted
                    m.rounds_on_hit += 1
                else:
                    m.accepted_on_miss += o.accepted
                    m.rounds_on_miss += 1
                if spec.source in self._tokens_by_source:
                    self._tokens_by_source[spec.source].append(o.accepted + 1)
                rank = tree.rank(s, o) if tree is not None else None
                self.stats[group].observe(o.accepted, o.proposed, rank)
            s.rounds += 1
            self._commit(s, list(spec.tokens[: o.accepted]) + [o.token])
            if s.done:
                continue
            if self.mode == "ar" or not self._spec_room(s):
                if self.target_context is not None and len(s.tokens) > self.target_context:
                    self._finish(s, "length")
                    continue
                s.spec = Speculation(tokens=(), q=None, source="none")
                continue
            if self.mode == "sd":
                s.spec = None
                need_draft.append(s)
                continue
            # ssd: look the outcome up in the speculation cache.
            m.cache_lookups += 1
            if spec.source == "cache":
                m.lookups_after_primary += 1
            else:
                m.lookups_after_backup += 1
            hit = tree.lookup(s, o) if tree is not None and len(spec.tokens) == self.k else None
            if hit is not None:
                m.cache_hits += 1
                if spec.source == "cache":
                    m.hits_after_primary += 1
                else:
                    m.hits_after_backup += 1
                xp = namespace(hit.rows[0])
                s.spec = Speculation(tokens=tuple(hit.tokens), q=xp.stack(hit.rows), source="cache")
                # The hit branch already holds the new context and its draft rows: it
                # becomes the sequence's draft handle, so the next glue pass feeds 1 token.
                # (Only a sequence's own branch: a handle is never shared between two.)
                if hit.seq is not s or hit.promoted:
                    continue
                retired.append(s.d_handle)
                hit.promoted = True
                first = len(hit.context) - 1
                s.d_handle = hit.handle
                s.d_held = hit.context + hit.tokens[:-1]
                s.d_rows = {first + j: row for j, row in enumerate(hit.raw)}
            else:
                s.spec = None
                fast_seqs.append(s)
        if tree is not None:
            self._queues[Lane.DRAFT].append(_CloseJob(Lane.DRAFT, tree.handles() + retired))
        if fast_seqs:
            kind: str = self.config.fallback
            if kind == "auto":
                kind = self._auto_fallback(len(fast_seqs), len(self._live()))
            self.metrics.fallbacks[kind] = self.metrics.fallbacks.get(kind, 0) + len(fast_seqs)
            if kind == "neural":
                need_draft.extend(fast_seqs)
            else:
                for s in fast_seqs:
                    toks = fast_backup_tokens(s.tokens, self.k)
                    s.spec = Speculation(tokens=toks, q=None, source="fast")
        self._after_round(need_draft)

    def _after_round(self, need_draft: list[_Seq] | None = None) -> None:
        """Close finished sequences' handles, then start drafting or the next round."""
        if need_draft is None:  # right after opening
            need_draft = []
            for s in self._live():
                if self.k == 0 or not self._spec_room(s):
                    s.spec = Speculation(tokens=(), q=None, source="none")
                else:
                    need_draft.append(s)
        finished = [
            s for s in self.seqs if s.done and (s.t_handle is not None or s.d_handle is not None)
        ]
        if finished:
            t = [s.t_handle for s in finished if s.t_handle is not None]
            d = [s.d_handle for s in finished if s.d_handle is not None]
            for s in finished:
                s.t_handle = s.d_handle = None
            self._queues[Lane.TARGET].append(_CloseJob(Lane.TARGET, t))
            self._queues[Lane.DRAFT].append(_CloseJob(Lane.DRAFT, d))
        if not self._live():
            self._goto(Event.ALL_FINISHED)
            return
        if need_draft:
            self._goto(Event.NEED_DRAFT)
            self._draft = _DraftJob(self, need_draft, source="neural")
            self._queues[Lane.DRAFT].append(self._draft)
        else:
            self._start_round()

    def _start_round(self) -> None:
        if self.phase is not Phase.VERIFYING:
            self._goto(Event.READY)
        live = self._live()
        self._verify = _VerifyJob(self, live)
        self._queues[Lane.TARGET].append(self._verify)
        if self.mode == "ssd":
            self._tree = _TreeJob(self, live)
            self._queues[Lane.DRAFT].append(self._tree)

    def _commit(self, s: _Seq, tokens: list[int]) -> None:
        new: list[int] = []
        for t in tokens:
            s.tokens.append(t)
            new.append(t)
            self.metrics.generated_tokens += 1
            gen = len(s.tokens) - s.prompt_len
            if t in s.stop_ids or any(
                gen >= len(seq) and tuple(s.tokens[-len(seq) :]) == seq
                for seq in s.params.stop_sequences
            ):
                self._finish(s, "stop")
                break
            if gen >= s.max_new:
                self._finish(s, "length")
                break
        if new:
            self._new_tokens.append((s.index, new))

    def _finish(self, s: _Seq, reason: str) -> None:
        s.done = True
        s.finish_reason = reason
        s.spec = None

    # -- policies ---------------------------------------------------------------------

    def fanout_for(self, source: str) -> tuple[int, ...]:
        """F_0..F_K for a tree predicting the outcome of a speculation from ``source``."""
        backup = source != "cache"
        value = self.config.fanout
        if backup and self.config.fanout_after_backup is not None:
            value = self.config.fanout_after_backup
        if isinstance(value, tuple):
            return value
        stats = self.stats["backup" if backup else "primary"]
        return stats.plan(value, self.k)

    def saguaro_fanout(self, *, backup: bool) -> tuple[int, ...]:
        """The F used to down-weight draft tokens under Saguaro sampling: the fan-out the
        *next* round's tree will cache at each position."""
        if self.saguaro_c >= 1.0:
            return (0,) * (self.k + 1)
        return self.fanout_for("neural" if backup else "cache")

    def _auto_fallback(self, missed: int, live: int) -> str:
        """Saguaro Thm 17: neural when its extra accepted tokens are worth the stall.

        Neural drafting stalls the whole batch for about ``T_jit``; it is worth it when
        ``missed * (E_neural - E_fast) / T_jit`` beats the batch's current throughput
        ``live * E_round / T_round``. Before anything was measured, neural.
        """
        if not self._jit_s or not self._round_s:
            return "neural"
        t_jit = float(np.mean(self._jit_s[-16:]))
        t_round = float(np.mean(self._round_s[-16:])) or 1e-9
        a = self.stats["backup"].accept_rate
        e_neural_prior = sum(a**j for j in range(self.k + 1))
        e_neural = (
            float(np.mean(self._tokens_by_source["neural"][-64:]))
            if self._tokens_by_source["neural"]
            else e_neural_prior
        )
        e_fast = (
            float(np.mean(self._tokens_by_source["fast"][-64:]))
            if self._tokens_by_source["fast"]
            else 1.0
        )
        m = self.metrics
        e_round = (m.generated_tokens / m.sequence_rounds) if m.sequence_rounds else e_neural
        gain_rate = missed * (e_neural - e_fast) / max(t_jit, 1e-9)
        return "neural" if gain_rate > live * e_round / t_round else "fast"
