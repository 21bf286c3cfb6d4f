"""The machine's jobs: one lane's work, one request at a time.

A job emits requests (:mod:`ssd_core._events`) through ``next`` and consumes their
results through ``receive``; :class:`~ssd_core._machine.Machine` queues them per lane
and moves between phases when they finish (see the theory of operation there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from ._config import SamplingParams
from ._errors import InternalError
from ._events import Close, Extend, Fork, Lane, Open, Request
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
from ._protocol import Handle
from ._random import Key
from ._sequence import Outcome, Speculation, _Seq, _sync

if TYPE_CHECKING:
    from ._machine import Machine


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
