"""The machine's jobs: one lane's work, one request at a time.

A job is built by the :class:`~ssd_core.Machine` from *frozen inputs* (a snapshot of
the sequences it serves) and a frozen :class:`JobContext`; it emits requests
(:mod:`ssd_core._requests`) through :meth:`Job.next`, consumes their results through
:meth:`Job.receive`, and when done holds a typed *result* (:class:`Opened`,
:class:`Drafted`, :class:`Verified`, :class:`TreeResult`) that the machine applies. A
job never sees the machine and never writes a sequence, so a driver may run a whole
job on a lane's worker thread.

The tree job's stages change only through :data:`TREE_TRANSITIONS`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat
import attrs

from ._config import SamplingParams
from ._errors import BackendContractError, InternalError
from ._math import (
    accept_probabilities,
    check_logits,
    count_above,
    draft_weights,
    move_like,
    namespace,
    residual_weights,
    target_probs,
    to_host,
    top_ids,
)
from ._policy import CostModel, confidence, predict_from
from ._protocol import Handle
from ._random import Key, RandomSource, Stream
from ._requests import Close, Extend, Fork, Lane, Open, Purpose, Request
from ._sequence import NO_SPECULATION, DraftHandle, Outcome, Speculation, TargetHandle

__all__ = [
    "TREE_TRANSITIONS",
    "Branch",
    "JobContext",
    "MathOps",
    "TreeStage",
]


def _default_target_probs(rows: Any, params: Sequence[SamplingParams], positions: Any) -> Any:
    return target_probs(rows, params)


def _default_lookup(branches: Sequence[Branch], sid: int, outcome: Outcome) -> Branch | None:
    for b in branches:
        if b.sid == sid and b.k == outcome.accepted and b.token == outcome.token:
            return b
    return None


@attrs.frozen(kw_only=True)
class MathOps:
    """The verification math and the cache lookup the machine uses: a public seam for
    audits and for the deliberately lossy variants the exactness tests must catch.

    Attributes:
        target_probs: ``(rows, params, positions) -> p``: processed target rows;
            ``positions[i]`` is row i's position in its sequence's verification block
            (0 = the first verified token).
        draft_weights: ``(logits, temperatures, fanouts, saguaro_c) -> q`` rows.
        accept_probabilities: ``(p, q, tokens) -> [min(1, p(d)/q(d))]``.
        residual_weights: ``(p_row, q_row) -> max(0, p - q)`` (p when it has no mass).
        lookup: ``(branches, sid, outcome) -> branch or None``: the cached branch
            that serves ``outcome`` of sequence ``sid``.
    """

    target_probs: Callable[[Any, Sequence[SamplingParams], Any], Any] = _default_target_probs
    draft_weights: Callable[[Any, Sequence[float], Sequence[int], float], Any] = draft_weights
    accept_probabilities: Callable[[Any, Any, Sequence[int]], list[float]] = accept_probabilities
    residual_weights: Callable[[Any, Any], Any] = residual_weights
    lookup: Callable[[Sequence[Branch], int, Outcome], Branch | None] = _default_lookup


#: The MathOps a Machine uses when none is given (a stack: see
#: :func:`ssd_core.testing.using_ops`).
_OPS_STACK: list[MathOps] = [MathOps()]


def default_ops() -> MathOps:
    """The MathOps new machines use: the exact math unless a test swapped it."""
    return _OPS_STACK[-1]


@attrs.frozen(kw_only=True)
class JobContext:
    """What every job may read: fixed for the machine's life."""

    k: int
    vocab_size: int
    source: RandomSource
    saguaro_c: float
    target_name: str
    draft_name: str
    ops: MathOps

    def contract(self, lane: Lane, message: str) -> BackendContractError:
        who = self.target_name if lane is Lane.TARGET else self.draft_name
        return BackendContractError(f"backend {who!r}: {message}")

    def name(self, lane: Lane) -> str:
        return self.target_name if lane is Lane.TARGET else self.draft_name


def _device(x: Any) -> Any:
    return array_api_compat.device(x)


def _draft_tokens(
    ctx: JobContext,
    rows: Any,
    temperatures: Sequence[float],
    fanouts: Sequence[int],
    keys: Sequence[Key],
) -> tuple[list[int], list[Any]]:
    """Draw one draft token per row: (tokens, the q row each was drawn from, ``None``
    for a greedy row). A greedy row's token is its lowest argmax -- a point mass, so
    there is nothing to draw and no row to keep (the verifier treats ``q=None`` as
    point masses)."""
    xp = namespace(rows)
    greedy = [i for i, t in enumerate(temperatures) if t == 0.0]
    sampled = [i for i, t in enumerate(temperatures) if t != 0.0]
    tokens: list[int] = [0] * len(temperatures)
    q: list[Any] = [None] * len(temperatures)
    if greedy:
        sub = rows if not sampled else _take(xp, rows, greedy)
        for i, t in zip(greedy, to_host(xp.argmax(sub, axis=1))):
            tokens[i] = int(t)
    if sampled:
        sub = rows if not greedy else _take(xp, rows, sampled)
        w = ctx.ops.draft_weights(
            sub, [temperatures[i] for i in sampled], [fanouts[i] for i in sampled], ctx.saguaro_c
        )
        drawn = ctx.source.categorical([keys[i] for i in sampled], w)
        for j, i in enumerate(sampled):
            tokens[i] = drawn[j]
            q[i] = w[j]
    return tokens, q


def _stack(rows: Sequence[Any]) -> Any:
    """A speculation's q: its rows stacked, or ``None`` for point masses (greedy)."""
    if not rows or rows[0] is None:
        return None
    return namespace(rows[0]).stack(list(rows))


def _take(xp: Any, rows: Any, index: Sequence[int]) -> Any:
    return xp.take(rows, xp.asarray(list(index), dtype=xp.int64, device=_device(rows)), axis=0)


# -- the job protocol ------------------------------------------------------------------


class Job:
    """One lane's unit of work. ``closes`` (handles to release first) ride along with
    whatever job next runs on the lane, so closing costs no extra hand-off."""

    lane: Lane
    purpose: Purpose | None = None

    def __init__(self, closes: Sequence[Handle] = ()) -> None:
        self.closes = tuple(closes)
        self._close_pending = bool(self.closes)
        self.done = False
        #: (kind of call, seconds as the driver reported them, rows scored).
        self.elapsed: list[tuple[str, float, int]] = []

    def next(self) -> Request | None:
        """The next request, or ``None`` when the job is done (the caller checks
        :attr:`done`). Called only when no request of this job is outstanding."""
        if self._close_pending:
            return Close(lane=self.lane, handles=self.closes)
        if self.done:
            return None
        req = self._next()
        if req is None:
            self.done = True
        return req

    def receive(self, request: Request, result: Any, elapsed: float = 0.0) -> None:
        """Consume the result of the request :meth:`next` returned last."""
        if isinstance(request, Close) and self._close_pending:
            self._close_pending = False
            self.elapsed.append(("cache_op", elapsed, 0))
            return
        if isinstance(request, Extend):
            self.elapsed.append((request.purpose.value, elapsed, request.rows))
        else:
            kind = "open" if isinstance(request, Open) else "cache_op"
            self.elapsed.append((kind, elapsed, 0))
        self._receive(request, result)

    def attach_closes(self, handles: Sequence[Handle]) -> None:
        """Release ``handles`` before the job's own first request."""
        self.closes = self.closes + tuple(handles)
        self._close_pending = bool(self.closes)

    def pending_closes(self) -> tuple[Handle, ...]:
        """The handles this job will close first and has not closed yet."""
        return self.closes if self._close_pending else ()

    @property
    def busy_s(self) -> float:
        return sum(t for _, t, _ in self.elapsed)

    def result(self) -> Any:
        return None

    def _next(self) -> Request | None:
        raise NotImplementedError

    def _receive(self, request: Request, result: Any) -> None:
        raise NotImplementedError


class CloseJob(Job):
    """Release handles when nothing else is about to run on the lane."""

    def __init__(self, lane: Lane, closes: Sequence[Handle]) -> None:
        super().__init__(closes)
        self.lane = lane

    def _next(self) -> Request | None:
        return None


# -- open ------------------------------------------------------------------------------


@attrs.frozen
class Opened:
    """Result of an :class:`OpenJob`: each sequence's new handle (empty prefill)."""

    lane: Lane
    handles: dict[int, Handle]


class OpenJob(Job):
    """Prefill: one handle per sequence holding all but its last prompt token."""

    def __init__(
        self,
        ctx: JobContext,
        lane: Lane,
        prompts: dict[int, tuple[int, ...]],
        closes: Sequence[Handle] = (),
    ) -> None:
        super().__init__(closes)
        self.ctx = ctx
        self.lane = lane
        self.prompts = prompts
        self._sent = False
        self._handles: dict[int, Handle] = {}

    def _next(self) -> Request | None:
        if self._sent:
            return None
        self._sent = True
        return Open(lane=self.lane, prompts=tuple(p[:-1] for p in self.prompts.values()))

    def _receive(self, request: Request, result: Any) -> None:
        handles = tuple(result)
        if len(handles) != len(self.prompts):
            raise self.ctx.contract(
                self.lane, f"open returned {len(handles)} handles for {len(self.prompts)} prompts"
            )
        self._handles = dict(zip(self.prompts, handles))

    def result(self) -> Opened:
        return Opened(lane=self.lane, handles=self._handles)

    def made(self) -> list[Handle]:
        return list(self._handles.values())


# -- verification ----------------------------------------------------------------------


@attrs.frozen
class VerifyInput:
    sid: int
    stream: Stream
    round: int
    tokens: tuple[int, ...]
    spec: Speculation
    params: SamplingParams
    target: TargetHandle


@attrs.frozen
class Verified:
    """Result of a :class:`VerifyJob`: each sequence's outcome and target handle."""

    outcomes: dict[int, Outcome]
    target: dict[int, TargetHandle]


class VerifyJob(Job):
    """One batched target pass over every member's speculation, then the
    rejection-sampling verification of each."""

    lane = Lane.TARGET
    purpose = Purpose.VERIFY

    def __init__(
        self, ctx: JobContext, seqs: Sequence[VerifyInput], closes: Sequence[Handle] = ()
    ) -> None:
        super().__init__(closes)
        self.ctx = ctx
        self.seqs = tuple(seqs)
        self._sent = False
        self._held: dict[int, TargetHandle] = {}
        self._outcomes: dict[int, Outcome] = {}
        #: Set (atomically) once the outcomes are known: what a pruned tree waits for.
        self.outcomes: dict[int, Outcome] | None = None

    def _next(self) -> Request | None:
        if self._sent:
            return None
        self._sent = True
        items = []
        for s in self.seqs:
            desired = s.tokens + s.spec.tokens
            keep, feed = s.target.sync(desired, len(s.tokens) - 1)
            items.append((s.target.handle, keep, feed))
            self._held[s.sid] = TargetHandle(handle=s.target.handle, held=desired)
        return Extend(lane=Lane.TARGET, items=tuple(items), purpose=Purpose.VERIFY)

    def _receive(self, request: Request, result: Any) -> None:
        ctx = self.ctx
        assert isinstance(request, Extend)
        logits = check_logits(
            result, request.rows, ctx.vocab_size, who=ctx.target_name, what="verification"
        )
        xp = namespace(logits)
        # Each sequence's K_i + 1 needed rows, by their row in ``logits``.
        blocks: list[list[int]] = []
        offset = 0
        for s, (_, _, feed) in zip(self.seqs, request.items):
            n = len(s.spec.tokens) + 1
            offset += len(feed)
            blocks.append(list(range(offset - n, offset)))
        greedy = [i for i, s in enumerate(self.seqs) if s.params.temperature == 0.0]
        sampled = [i for i, s in enumerate(self.seqs) if s.params.temperature != 0.0]
        outcomes: dict[int, Outcome] = {}
        if greedy:
            outcomes.update(
                self._greedy(
                    xp, logits, [self.seqs[i] for i in greedy], [blocks[i] for i in greedy]
                )
            )
        if sampled:
            outcomes.update(
                self._sampled(
                    xp, logits, [self.seqs[i] for i in sampled], [blocks[i] for i in sampled]
                )
            )
        self._outcomes = {s.sid: outcomes[s.sid] for s in self.seqs}
        self.outcomes = self._outcomes

    @staticmethod
    def _greedy(
        xp: Any, logits: Any, seqs: list[VerifyInput], blocks: list[list[int]]
    ) -> dict[int, Outcome]:
        """Temperature 0: the processed target is one-hot at the lowest argmax, so draft
        token d_i is accepted with probability 1 iff it is that argmax and 0 otherwise,
        and the recovery or bonus token is the argmax itself -- for any proposal q. No
        probabilities and no draws are needed; only the argmaxes cross to the host."""
        picks = [r for b in blocks for r in b]
        rows = xp.take(logits, xp.asarray(picks, dtype=xp.int64, device=_device(logits)), axis=0)
        best = [int(t) for t in to_host(xp.argmax(rows, axis=1))]
        out, at = {}, 0
        for s, b in zip(seqs, blocks):
            a = 0
            while a < len(s.spec.tokens) and s.spec.tokens[a] == best[at + a]:
                a += 1
            out[s.sid] = Outcome(accepted=a, token=best[at + a], proposed=len(s.spec.tokens))
            at += len(b)
        return out

    def _sampled(
        self, xp: Any, logits: Any, seqs: list[VerifyInput], blocks: list[list[int]]
    ) -> dict[int, Outcome]:
        ctx, ops = self.ctx, self.ctx.ops
        picks: list[int] = []
        params: list[SamplingParams] = []
        positions: list[int] = []
        for s, b in zip(seqs, blocks):
            picks.extend(b)
            params.extend([s.params] * len(b))
            positions.extend(range(len(b)))
        rows = xp.take(logits, xp.asarray(picks, dtype=xp.int64, device=_device(logits)), axis=0)
        p = ops.target_probs(rows, params, tuple(positions))

        starts, at = [], 0
        q_rows: list[Any] = []
        for s in seqs:
            starts.append(at)
            k = len(s.spec.tokens)
            at += k + 1
            if not k:
                q_rows.append(None)
            elif s.spec.q is None:
                # Point masses (fast backup tokens, a greedy draft): one-hot rows,
                # built where p lives.
                cols = xp.arange(ctx.vocab_size, device=_device(p))
                toks = xp.asarray(list(s.spec.tokens), device=_device(p))
                q_rows.append(xp.astype(cols[None, :] == toks[:, None], xp.float64))
            else:
                q_rows.append(move_like(s.spec.q, p))
        accept_p = [
            ops.accept_probabilities(p[st : st + len(s.spec.tokens)], q, s.spec.tokens)
            if s.spec.tokens
            else []
            for s, st, q in zip(seqs, starts, q_rows)
        ]
        # Acceptance tests, one position at a time so a rejection ends the draws.
        accepted = [0] * len(seqs)
        running = [i for i, s in enumerate(seqs) if s.spec.tokens]
        pos = 0
        while running:
            keys: list[Key] = [("accept", seqs[i].stream, seqs[i].round, pos) for i in running]
            draws = ctx.source.bernoulli(keys, [accept_p[i][pos] for i in running])
            still = []
            for i, ok in zip(running, draws):
                if ok:
                    accepted[i] += 1
                    if accepted[i] < len(seqs[i].spec.tokens):
                        still.append(i)
            running = still
            pos += 1

        # One recovery (residual) or bonus draw per sequence, batched.
        last_rows = []
        for i, (s, st, q) in enumerate(zip(seqs, starts, q_rows)):
            a = accepted[i]
            if a < len(s.spec.tokens):
                last_rows.append(ops.residual_weights(p[st + a], q[a]))
            else:
                last_rows.append(p[st + a])
        token_keys: list[Key] = [("token", s.stream, s.round) for s in seqs]
        tokens = ctx.source.categorical(token_keys, xp.stack(last_rows))
        return {
            s.sid: Outcome(accepted=accepted[i], token=tokens[i], proposed=len(s.spec.tokens))
            for i, s in enumerate(seqs)
        }

    def result(self) -> Verified:
        return Verified(outcomes=self._outcomes, target=self._held)


# -- just-in-time drafting -------------------------------------------------------------


@attrs.frozen
class DraftInput:
    sid: int
    stream: Stream
    round: int
    tokens: tuple[int, ...]
    params: SamplingParams
    draft: DraftHandle
    #: How many tokens to draft (>= 1).
    steps: int
    #: Saguaro's F per drafted position (the fan-out the next tree will cache there).
    saguaro_fan: tuple[int, ...]
    #: With a calibration table (predicted acceptance per confidence bin) and costs,
    #: a position is proposed only while it pays (see :mod:`ssd_core._policy`);
    #: ``None`` proposes all ``steps``.
    table: tuple[float, ...] | None = None
    cost: CostModel | None = None


@attrs.frozen
class Drafted:
    """Result of a :class:`DraftJob`: each sequence's speculation and draft handle."""

    specs: dict[int, Speculation]
    draft: dict[int, DraftHandle]


class DraftJob(Job):
    """Draft up to K tokens for some sequences, one batched draft pass per token."""

    lane = Lane.DRAFT
    purpose = Purpose.DRAFT

    def __init__(
        self, ctx: JobContext, seqs: Sequence[DraftInput], closes: Sequence[Handle] = ()
    ) -> None:
        super().__init__(closes)
        self.ctx = ctx
        self.seqs = tuple(seqs)
        self.step = 0
        self._handles = {s.sid: s.draft for s in self.seqs}
        self._tokens: dict[int, list[int]] = {s.sid: [] for s in self.seqs}
        self._rows: dict[int, list[Any]] = {s.sid: [] for s in self.seqs}
        self._fed_from: list[int] = []
        self._active: list[DraftInput] = []
        self._conf: dict[int, list[float]] = {s.sid: [] for s in self.seqs}
        #: Per sequence: (expected tokens, survival, cost) of what is proposed so far.
        self._value = {
            s.sid: (1.0, 1.0, s.cost.verify_call + s.cost.verify_row) if s.cost else None
            for s in self.seqs
        }
        self._stopped: set[int] = set()

    def _next(self) -> Request | None:
        self._active = [s for s in self.seqs if s.steps > self.step and s.sid not in self._stopped]
        if not self._active:
            return None
        items = []
        self._fed_from = []
        for s in self._active:
            d = self._handles[s.sid]
            if self.step == 0:
                keep, feed, start, kept = d.plan(s.tokens, len(s.tokens) - 1)
                held = s.tokens
            else:
                keep, feed, start, kept = (
                    None,
                    (self._tokens[s.sid][-1],),
                    len(d.held),
                    dict(d.rows),
                )
                held = d.held + feed
            self._handles[s.sid] = DraftHandle(handle=d.handle, held=held, rows=kept)
            self._fed_from.append(start)
            items.append((d.handle, keep, feed))
        return Extend(lane=Lane.DRAFT, items=tuple(items), purpose=Purpose.DRAFT)

    def _receive(self, request: Request, result: Any) -> None:
        ctx = self.ctx
        assert isinstance(request, Extend)
        logits = check_logits(
            result, request.rows, ctx.vocab_size, who=ctx.draft_name, what="drafting"
        )
        xp = namespace(logits)
        last, offset = [], 0
        for s, start, (_, _, feed) in zip(self._active, self._fed_from, request.items):
            d = self._handles[s.sid]
            rows = dict(d.rows)
            for j in range(len(feed)):
                rows[start + j] = logits[offset + j]
            self._handles[s.sid] = DraftHandle(handle=d.handle, held=d.held, rows=rows)
            offset += len(feed)
            last.append(offset - 1)
        picked = xp.take(logits, xp.asarray(last, device=_device(logits)), axis=0)
        # Decide from the rows -- before drawing -- which sequences propose this position.
        conf = confidence(picked)
        go = [i for i, s in enumerate(self._active) if self._proposes(s, conf[i])]
        if len(go) < len(self._active):
            self._stopped.update(s.sid for i, s in enumerate(self._active) if i not in go)
            self._active = [self._active[i] for i in go]
            conf = [conf[i] for i in go]
            if go:
                index = xp.asarray(go, dtype=xp.int64, device=_device(picked))
                picked = xp.take(picked, index, axis=0)
        if self._active:
            drawn, q = _draft_tokens(
                ctx,
                picked,
                [s.params.effective_draft_temperature for s in self._active],
                [s.saguaro_fan[self.step] for s in self._active],
                [("neural", s.stream, s.round, self.step) for s in self._active],
            )
            for i, s in enumerate(self._active):
                self._tokens[s.sid].append(drawn[i])
                self._rows[s.sid].append(q[i])
                self._conf[s.sid].append(conf[i])
        self.step += 1

    def _proposes(self, s: DraftInput, conf: float) -> bool:
        """Whether position ``self.step`` is worth proposing (a function of the row)."""
        value = self._value[s.sid]
        if value is None or s.table is None or s.cost is None:
            return True
        tokens, survive, spent = value
        survive *= predict_from(s.table, [conf])[0]
        each = s.cost.verify_row + s.cost.draft_step
        if (tokens + survive) * spent <= tokens * (spent + each):
            return False
        self._value[s.sid] = (tokens + survive, survive, spent + each)
        return True

    def result(self) -> Drafted:
        specs = {}
        for s in self.seqs:
            rows = self._rows[s.sid]
            if not rows:  # nothing was worth proposing: a plain target step
                specs[s.sid] = NO_SPECULATION
                continue
            specs[s.sid] = Speculation(
                tokens=tuple(self._tokens[s.sid]),
                q=_stack(rows),
                source="neural",
                conf=tuple(self._conf[s.sid]),
            )
        return Drafted(specs=specs, draft=self._handles)


# -- the SSD tree ----------------------------------------------------------------------


class TreeStage(enum.Enum):
    GLUE = "glue"  # score the speculation being verified: rows g_0..g_K
    FORK = "fork"  # one handle per cached candidate
    STEP = "step"  # one batched draft token per live branch
    DONE = "done"


class TreeEvent(enum.Enum):
    GLUED = "glued"
    NO_BRANCHES = "no_branches"
    FORKED = "forked"
    STEPPED = "stepped"
    COMPLETE = "complete"
    ALL_PRUNED = "all_pruned"


#: (stage, event) -> next stage of a tree job.
TREE_TRANSITIONS: dict[tuple[TreeStage, TreeEvent], TreeStage] = {
    (TreeStage.GLUE, TreeEvent.GLUED): TreeStage.FORK,
    (TreeStage.GLUE, TreeEvent.NO_BRANCHES): TreeStage.DONE,
    (TreeStage.FORK, TreeEvent.FORKED): TreeStage.STEP,
    (TreeStage.FORK, TreeEvent.ALL_PRUNED): TreeStage.DONE,
    (TreeStage.STEP, TreeEvent.STEPPED): TreeStage.STEP,
    (TreeStage.STEP, TreeEvent.COMPLETE): TreeStage.DONE,
    (TreeStage.STEP, TreeEvent.ALL_PRUNED): TreeStage.DONE,
}


@attrs.frozen
class TreeInput:
    sid: int
    stream: Stream
    round: int
    tokens: tuple[int, ...]
    spec: Speculation
    params: SamplingParams
    draft: DraftHandle
    #: F_0..F_{K_i}: candidates to cache after "k accepted", k = 0..len(spec).
    fanout: tuple[int, ...]
    #: Tree-decode steps a branch that serves "k accepted" needs (0: none).
    steps: tuple[int, ...]
    #: Saguaro's F per decoded position (the fan-out the round after will cache).
    saguaro_fan: tuple[int, ...]


@attrs.define(eq=False)
class Branch:
    """One cached speculation: for sequence ``sid`` after the outcome "``k`` accepted,
    then ``token``". ``context`` is what the branch handle holds once ``token`` is fed;
    ``tokens`` and ``q`` are the sampled speculation, ``raw`` its raw draft rows."""

    sid: int
    k: int
    token: int
    context: tuple[int, ...]
    steps: int
    handle: Handle = None
    tokens: list[int] = attrs.field(factory=list)
    q: list[Any] = attrs.field(factory=list)
    raw: list[Any] = attrs.field(factory=list)

    @property
    def complete(self) -> bool:
        return len(self.tokens) == self.steps


@attrs.frozen
class TreeResult:
    """Result of a :class:`TreeJob`."""

    #: Rows g_0..g_{K_i} per sequence (for the rank of the realised outcome).
    glue: dict[int, Any]
    #: Each sequence's draft handle after the glue pass.
    draft: dict[int, DraftHandle]
    branches: tuple[Branch, ...]

    def handles(self) -> list[Handle]:
        return [b.handle for b in self.branches if b.handle is not None]

    def rank(self, sid: int, spec: Speculation, outcome: Outcome) -> int | None:
        """1 + how many candidates the draft ranked above the realised token."""
        g = self.glue.get(sid)
        if g is None:
            return None
        k = outcome.accepted
        exclude = spec.tokens[k] if k < len(spec.tokens) else None
        return count_above(g[k], outcome.token, exclude) + 1


class TreeJob(Job):
    """SSD's draft-side work during a verification: glue pass, forks, tree decode.

    When the verification finishes first, :meth:`prune` names the one outcome per
    sequence that can still be used; every other branch is dropped, and no draw is made
    for a dropped branch (names stay unique). ``prune`` only swaps one reference, so it
    is safe to call while a worker thread runs the job.
    """

    lane = Lane.DRAFT

    def __init__(
        self, ctx: JobContext, seqs: Sequence[TreeInput], closes: Sequence[Handle] = ()
    ) -> None:
        super().__init__(closes)
        self.ctx = ctx
        self.seqs = tuple(seqs)
        self.stage = TreeStage.GLUE
        self.step = 0
        self._wanted: dict[int, tuple[int, int]] | None = None
        self._glue: dict[int, Any] = {}
        self._draft: dict[int, DraftHandle] = {s.sid: s.draft for s in self.seqs}
        self.branches: list[Branch] = []
        self._sent: list[Branch] = []
        self._fed_from: list[int] = []

    def prune(self, outcomes: dict[int, Outcome]) -> None:
        self._wanted = {sid: (o.accepted, o.token) for sid, o in outcomes.items()}

    def _goto(self, event: TreeEvent) -> None:
        try:
            self.stage = TREE_TRANSITIONS[(self.stage, event)]
        except KeyError:
            raise InternalError(f"tree job: no transition from {self.stage} on {event}") from None

    def _live(self) -> list[Branch]:
        wanted = self._wanted
        return [
            b
            for b in self.branches
            if b.steps > self.step
            and (wanted is None or wanted.get(b.sid) == (b.k, b.token))
            and (self.stage is TreeStage.FORK or b.handle is not None)
        ]

    def _next(self) -> Request | None:
        if self.stage is TreeStage.GLUE:
            items: list[tuple[Handle, int | None, tuple[int, ...]]] = []
            self._fed_from = []
            for s in self.seqs:
                desired = s.tokens + s.spec.tokens
                d = self._draft[s.sid]
                keep, feed, start, kept = d.plan(desired, len(s.tokens) - 1)
                self._draft[s.sid] = DraftHandle(handle=d.handle, held=desired, rows=kept)
                items.append((d.handle, keep, feed))
                self._fed_from.append(start)
            return Extend(lane=Lane.DRAFT, items=tuple(items), purpose=Purpose.GLUE)
        if self.stage is TreeStage.DONE:
            return None
        self._sent = self._live()
        if not self._sent:
            self._goto(TreeEvent.ALL_PRUNED)
            return None
        if self.stage is TreeStage.FORK:
            by_sid = {s.sid: s for s in self.seqs}
            return Fork(
                lane=Lane.DRAFT,
                items=tuple(
                    (self._draft[b.sid].handle, len(by_sid[b.sid].tokens) + b.k) for b in self._sent
                ),
            )
        return Extend(
            lane=Lane.DRAFT,
            items=tuple(
                (b.handle, None, (b.token if self.step == 0 else b.tokens[-1],)) for b in self._sent
            ),
            purpose=Purpose.TREE,
        )

    def _receive(self, request: Request, result: Any) -> None:
        ctx = self.ctx
        if self.stage is TreeStage.GLUE:
            assert isinstance(request, Extend)
            logits = check_logits(
                result, request.rows, ctx.vocab_size, who=ctx.draft_name, what="glue pass"
            )
            xp = namespace(logits)
            offset = 0
            for s, start, (_, _, feed) in zip(self.seqs, self._fed_from, request.items):
                d = self._draft[s.sid]
                rows = dict(d.rows)
                for j in range(len(feed)):
                    rows[start + j] = logits[offset + j]
                self._draft[s.sid] = DraftHandle(handle=d.handle, held=d.held, rows=rows)
                offset += len(feed)
                first = len(s.tokens) - 1
                self._glue[s.sid] = xp.stack(
                    [rows[p] for p in range(first, first + len(s.spec.tokens) + 1)]
                )
            self._plan_branches()
            self._goto(TreeEvent.GLUED if self.branches else TreeEvent.NO_BRANCHES)
        elif self.stage is TreeStage.FORK:
            handles = tuple(result)
            if len(handles) != len(self._sent):
                raise ctx.contract(
                    Lane.DRAFT, f"fork returned {len(handles)} handles for {len(self._sent)} forks"
                )
            for b, h in zip(self._sent, handles):
                b.handle = h
            self._goto(TreeEvent.FORKED)
        else:
            assert isinstance(request, Extend)
            logits = check_logits(
                result, request.rows, ctx.vocab_size, who=ctx.draft_name, what="tree decode"
            )
            # Only branches still wanted draw (a prune may have landed meanwhile).
            wanted = self._wanted
            keep = [
                i
                for i, b in enumerate(self._sent)
                if wanted is None or wanted.get(b.sid) == (b.k, b.token)
            ]
            if keep:
                xp = namespace(logits)
                live = [self._sent[i] for i in keep]
                rows = (
                    logits
                    if len(keep) == len(self._sent)
                    else xp.take(logits, xp.asarray(keep, device=_device(logits)), axis=0)
                )
                by_sid = {s.sid: s for s in self.seqs}
                drawn, q = _draft_tokens(
                    ctx,
                    rows,
                    [by_sid[b.sid].params.effective_draft_temperature for b in live],
                    [_at(by_sid[b.sid].saguaro_fan, self.step) for b in live],
                    [
                        (
                            "tree",
                            by_sid[b.sid].stream,
                            by_sid[b.sid].round + 1,
                            b.k,
                            b.token,
                            self.step,
                        )
                        for b in live
                    ],
                )
                for i, b in enumerate(live):
                    b.tokens.append(drawn[i])
                    b.q.append(q[i])
                    b.raw.append(rows[i])
            self.step += 1
            more = any(b.steps > self.step for b in self.branches if b.handle is not None)
            self._goto(TreeEvent.STEPPED if more else TreeEvent.COMPLETE)

    def _plan_branches(self) -> None:
        wanted = self._wanted
        for s in self.seqs:
            g = self._glue[s.sid]
            spec = s.spec.tokens
            for k in range(len(spec) + 1):
                if s.fanout[k] <= 0 or s.steps[k] <= 0:
                    continue
                exclude = spec[k] if k < len(spec) else None
                for t in top_ids(g[k], s.fanout[k], exclude=exclude):
                    if wanted is not None and wanted.get(s.sid) != (k, t):
                        continue
                    context = s.tokens + spec[:k] + (t,)
                    self.branches.append(
                        Branch(sid=s.sid, k=k, token=t, context=context, steps=s.steps[k])
                    )

    def made(self) -> list[Handle]:
        """Every branch handle the job holds (for cleanup)."""
        return [b.handle for b in self.branches if b.handle is not None]

    def result(self) -> TreeResult:
        return TreeResult(glue=self._glue, draft=self._draft, branches=tuple(self.branches))


def _at(values: tuple[int, ...], i: int) -> int:
    return values[i] if i < len(values) else 0
