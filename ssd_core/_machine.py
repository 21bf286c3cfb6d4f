"""The Saguaro state machine (sans-I/O).

Theory of operation
===================

The machine generates tokens for a changing set of sequences in *rounds*. Sequences
join at any time (:meth:`Machine.add`) and leave as soon as they finish or are
cancelled (:meth:`Machine.finish`). In every round each member has a *speculation* --
up to K draft tokens with the proposal rows q they were sampled from (none in AR mode)
-- and the target verifies all of them in one batched pass: token ``d_i`` is accepted
with probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection a recovery
token is drawn from ``max(0, p_i - q_i)`` renormalised, and if all are accepted a bonus
token is drawn from ``p_{K+1}``. This is exact for *any* proposal, which is why
everything else here is free to be clever.

Where the next speculation comes from is what the modes differ in:

* ``ar``  -- none: the target alone, one token per pass.
* ``sd``  -- the draft drafts it just in time (a DRAFTING stage), then the target verifies.
* ``ssd`` -- while the target verifies, the draft runs a *tree job*: a glue pass over
  the speculation being verified (rows g_0..g_K), the top-F_k candidates of g_k for
  every possible outcome "k accepted, then token t" (the rejected d_{k+1} excluded),
  one forked branch per candidate, and tree-decode steps per branch. The results fill
  a speculation cache keyed by (sequence, k, t). When the verification ends the
  outcome is looked up: a *hit* is the next speculation, ready at once; a *miss* goes
  to a fallback -- ``neural`` (just-in-time drafting) or ``fast`` (n-gram backup
  tokens, proposed as point masses).

Ownership. The machine owns every sequence (:class:`~ssd_core._sequence.Seq`) and is
the only code that writes one. Work happens in *jobs* (:mod:`ssd_core._jobs`), queued
per lane (target, draft), one running per lane: a job is built from a frozen snapshot
of the sequences it serves, emits requests, and returns a typed result that the
machine applies through one continuation per job kind (``_on_opened``,
``_on_drafted``, ``_on_verified``, ``_on_tree``). A sequence's stage changes only
through :data:`~ssd_core._sequence.SEQUENCE_TRANSITIONS`, the machine's own state
(running, degraded, error) only through :data:`MACHINE_TRANSITIONS`, and a tree job's
stage through :data:`~ssd_core._jobs.TREE_TRANSITIONS`.

Driving it. A driver either asks :meth:`Machine.next_request` per lane and hands each
result back through :meth:`Machine.deliver` (request by request, in whatever order they
complete), or takes whole jobs with :meth:`Machine.next_job` and hands each back,
finished, through :meth:`Machine.complete` (a lane worker runs the job's requests
itself). A round starts when no sequence is drafting just in time and some are ready;
sequences that join meanwhile are prefilled and drafted while the round runs and join
the next one.

Randomness. Every draw is named by ``(purpose, stream, round, ...)``, where *stream*
is the sequence's own seed and index and *round* counts its own rounds; the seeded
source derives each draw from the seed and the name alone, so a request's tokens do
not depend on what else is in flight, on when it joined, or on the order a driver
completes requests in. When a verification finishes before the tree, the tree is
*pruned* to the branch that can still be used; that changes the work done, never a
token.

Errors. An exception inside the machine, or one a driver reports with :meth:`fail`,
moves it to ERROR through the table; later calls raise :class:`MachineError`. A draft
lane that fails can instead be *lost* (:meth:`lose_draft`): the machine moves to
DEGRADED and every sequence continues with plain target steps -- exact, and without
losing a token.
"""

from __future__ import annotations

import enum
import io
import logging
import pickle
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import attrs
import numpy as np

from ._config import SamplingParams, SSDConfig
from ._errors import BackendContractError, InternalError, MachineError
from ._fanout import OutcomeStats
from ._jobs import (
    Branch,
    CloseJob,
    Drafted,
    DraftInput,
    DraftJob,
    Job,
    JobContext,
    MathOps,
    Opened,
    OpenJob,
    TreeInput,
    TreeJob,
    TreeResult,
    Verified,
    VerifyInput,
    VerifyJob,
    _stack,
    default_ops,
    saguaro_c_for,
)
from ._math import namespace, to_host
from ._metrics import Counters, LaneTimes, Metrics, RequestMetrics
from ._policy import (
    CostFit,
    CostModel,
    choose_budget,
    confidence,
    hit_curve,
    keep_length,
    predict_from,
    worth_drafting,
)
from ._protocol import Handle
from ._random import RandomSource, Stream
from ._requests import Lane, Request
from ._sequence import (
    FAST_CONFIDENCE,
    NO_SPECULATION,
    SEQUENCE_TRANSITIONS,
    DraftHandle,
    Outcome,
    Seq,
    SeqEvent,
    Speculation,
    Stage,
    TargetHandle,
    fast_backup,
)

log = logging.getLogger("ssd_core")

__all__ = [
    "MACHINE_TRANSITIONS",
    "Finished",
    "Machine",
    "MachineEvent",
    "MachineState",
    "SequenceView",
    "TokensCommitted",
]


class MachineState(enum.Enum):
    RUNNING = "running"
    DEGRADED = "degraded"  # the draft lane was lost: target-only rounds from now on
    ERROR = "error"


class MachineEvent(enum.Enum):
    DRAFT_LOST = "draft_lost"
    FAIL = "fail"


#: (state, event) -> next state. Every change of the machine's own state goes through here.
MACHINE_TRANSITIONS: dict[tuple[MachineState, MachineEvent], MachineState] = {
    (MachineState.RUNNING, MachineEvent.DRAFT_LOST): MachineState.DEGRADED,
    (MachineState.RUNNING, MachineEvent.FAIL): MachineState.ERROR,
    (MachineState.DEGRADED, MachineEvent.FAIL): MachineState.ERROR,
}


@attrs.frozen
class TokensCommitted:
    """Tokens a sequence committed in one round, in order."""

    sid: int
    tokens: tuple[int, ...]


@attrs.frozen
class Finished:
    """A sequence finished: ``"stop"``, ``"length"`` or ``"cancelled"``."""

    sid: int
    reason: str


@attrs.frozen
class SequenceView:
    """A read-only look at one sequence (for drivers, engines and tests)."""

    sid: int
    stream: Stream
    stage: Stage
    prompt_len: int
    tokens: tuple[int, ...]
    finish_reason: str | None
    speculation: Speculation | None

    @property
    def generated(self) -> tuple[int, ...]:
        return self.tokens[self.prompt_len :]


@attrs.define(eq=False)
class _Round:
    members: list[int]
    verify: VerifyJob
    tree: TreeJob | None
    verified: Verified | None = None
    tree_result: TreeResult | None = None
    tree_done: bool = False


class Machine:
    """The Saguaro state machine: sequences join and leave, rounds run over the ones
    that are ready. See the module's theory of operation.

    Args:
        mode: ``"ar"``, ``"sd"`` or ``"ssd"``.
        config: the SSD configuration (K, fan-out, C, fallback).
        vocab_size: shared by target and draft.
        source: the random source.
        target_context / draft_context: the models' context sizes (None = unbounded).
        target_name / draft_name: for error messages.
        ops: the verification math and cache lookup (a seam for audits; default:
            :func:`ssd_core.testing.using_ops`'s, normally the exact math).
        on_draft_error: ``"raise"`` (a draft-lane fault fails the machine) or
            ``"degrade"`` (it is lost: see :meth:`lose_draft`).
        cost: the models' declared costs, for ``config.cost == "declared"`` (the
            engine passes :meth:`CostModel.from_models`); default a memory-bound target.
        overlap: whether the draft's work runs while the target verifies (its own
            thread or device); ``False`` (a draft the engine runs on its own thread)
            charges a speculation tree in full, so a tree is built only where its
            cache hits save more than it costs.

    The machine trusts its inputs: :class:`~ssd_core.Engine` validates what users
    give it before anything reaches :meth:`add`.
    """

    def __init__(
        self,
        *,
        mode: str,
        config: SSDConfig,
        vocab_size: int,
        source: RandomSource,
        target_context: int | None = None,
        draft_context: int | None = None,
        target_name: str = "target",
        draft_name: str = "draft",
        ops: MathOps | None = None,
        on_draft_error: str = "raise",
        cost: CostModel | None = None,
        overlap: bool = True,
    ) -> None:
        self.mode = mode
        self.overlap = overlap
        self.config = config
        self.on_draft_error = on_draft_error
        if isinstance(config.cost, CostModel):
            self._declared = config.cost
        else:
            self._declared = cost if cost is not None else CostModel.memory_bound()
        self._fits = {"verify": CostFit(), "draft": CostFit()}
        self.k = config.k if mode != "ar" else 0
        self.target_context = target_context
        self.draft_context = draft_context
        self.state = MachineState.RUNNING
        self.error: BaseException | None = None
        self._ctx = JobContext(
            k=self.k,
            vocab_size=vocab_size,
            source=source,
            saguaro_c=config.saguaro_c if mode == "ssd" else 1.0,
            target_name=target_name,
            draft_name=draft_name,
            ops=ops if ops is not None else default_ops(),
        )
        self._seqs: dict[int, Seq] = {}
        self._next_sid = 0
        self._queues: dict[Lane, deque[Job]] = {Lane.TARGET: deque(), Lane.DRAFT: deque()}
        self._running: dict[Lane, Job | None] = {Lane.TARGET: None, Lane.DRAFT: None}
        self._outstanding: dict[Lane, Request | None] = {Lane.TARGET: None, Lane.DRAFT: None}
        self._ready_request: dict[Lane, Request | None] = {Lane.TARGET: None, Lane.DRAFT: None}
        #: Jobs handed to a worker by :meth:`next_job`, until :meth:`complete`.
        self._detached: dict[Lane, Job | None] = {Lane.TARGET: None, Lane.DRAFT: None}
        self._closes: dict[Lane, list[Handle]] = {Lane.TARGET: [], Lane.DRAFT: []}
        #: Draft handles left behind when the draft lane was lost (never called again).
        self.orphans: list[Handle] = []
        self._round: _Round | None = None
        self._events: list[TokensCommitted | Finished] = []
        self.counters = Counters()
        self.times = LaneTimes()
        self.rounds = 0
        self.draft_faults = 0
        # Measurements for fallback="auto" (seconds, tokens per round).
        self._jit_s: deque[float] = deque(maxlen=16)
        self._round_s: deque[float] = deque(maxlen=16)
        self._tokens_by_source: dict[str, deque[int]] = {
            "neural": deque(maxlen=64),
            "fast": deque(maxlen=64),
        }

    @property
    def source(self) -> RandomSource:
        return self._ctx.source

    @property
    def vocab_size(self) -> int:
        return self._ctx.vocab_size

    # -- joining and leaving ----------------------------------------------------------

    def add(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        max_new_tokens: int,
        stream: Stream,
        stop_ids: frozenset[int] = frozenset(),
    ) -> int:
        """Add a sequence; returns its id. It is prefilled on the lanes while whatever
        is in flight runs, and joins the first round that starts once it is ready.

        ``prompt`` must be non-empty, in the vocabulary, and fit the target's context.
        A prompt the draft's context cannot hold runs with plain target steps.
        """
        self._check_alive()
        try:
            sid = self._next_sid
            self._next_sid += 1
            fits_draft = self.draft_context is None or len(prompt) <= self.draft_context
            window = self.config.rank_window
            s = Seq(
                sid=sid,
                stream=stream,
                prompt_len=len(prompt),
                tokens=[int(t) for t in prompt],
                params=params,
                stop_ids=stop_ids,
                max_new=max_new_tokens,
                speculates=self.k > 0 and self.state is MachineState.RUNNING and fits_draft,
                stats={"primary": OutcomeStats(window), "backup": OutcomeStats(window)},
            )
            self._seqs[sid] = s
            if max_new_tokens == 0:
                self._finish(s, "length")
                self._release()
                return sid
            self._enqueue_open(Lane.TARGET, s)
            if s.speculates:
                self._enqueue_open(Lane.DRAFT, s)
            return sid
        except BaseException as exc:
            self.fail(exc)
            raise

    def finish(self, sid: int, reason: str = "cancelled", *, keep: int | None = None) -> None:
        """End sequence ``sid`` now (a cancel, or a stop the caller detected). With
        ``keep``, only its first ``keep`` generated tokens count. Its handles are
        closed as soon as no job uses them (within one round). A finished or unknown
        sequence is left alone."""
        self._check_alive()
        s = self._seqs.get(sid)
        if s is None or not s.live:
            return
        try:
            if keep is not None and keep < len(s.generated):
                del s.tokens[s.prompt_len + keep :]
            self._finish(s, reason)
            self._release()
        except BaseException as exc:
            self.fail(exc)
            raise

    def forget(self, sid: int) -> None:
        """Drop a closed sequence's record (long-running engines call this)."""
        s = self._seqs.get(sid)
        if s is not None and s.stage is Stage.CLOSED:
            del self._seqs[sid]

    # -- request-level driving --------------------------------------------------------

    def next_request(self, lane: Lane) -> Request | None:
        """The next request for ``lane``, or ``None`` if it has nothing to do right now
        (or already has a request outstanding)."""
        self._check_alive()
        if self._outstanding[lane] is not None:
            return None
        try:
            while True:
                req = self._ready_request[lane]
                if req is not None:
                    self._ready_request[lane] = None
                    self._outstanding[lane] = req
                    return req
                if self._running[lane] is None and not self._start_job(lane):
                    return None
                self._advance(lane)
        except BaseException as exc:
            self.fail(exc)
            raise

    def deliver(self, request: Request, result: Any, elapsed: float = 0.0) -> None:
        """Hand back ``request``'s result; ``elapsed`` is its (real or virtual) duration."""
        self._check_alive()
        lane = request.lane
        if self._outstanding[lane] is not request:
            raise MachineError(
                f"result delivered for a request that is not outstanding: {request!r}"
            )
        self._outstanding[lane] = None
        job = self._running[lane]
        assert job is not None
        try:
            job.receive(request, result, elapsed)
        except BackendContractError as exc:
            self.fault(lane, exc)  # the backend broke its contract: a lane fault
            return
        except BaseException as exc:
            self.fail(exc)
            raise
        try:
            self._advance(lane)
        except BaseException as exc:
            self.fail(exc)
            raise

    def outstanding(self, lane: Lane) -> Request | None:
        """The request ``lane`` is waiting on, if any."""
        return self._outstanding[lane]

    def _advance(self, lane: Lane) -> None:
        """Ask the lane's running job for its next request; apply the job if done."""
        job = self._running[lane]
        assert job is not None
        req = job.next()
        if req is not None:
            self._ready_request[lane] = req
            return
        self._running[lane] = None
        self._complete(job)

    # -- job-level driving ------------------------------------------------------------

    def next_job(self, lane: Lane) -> Job | None:
        """The next job for ``lane`` to run to completion on a worker, or ``None``.
        The caller runs ``next``/``receive`` until ``next`` returns ``None`` (the job
        is then ``done``) and hands it back with :meth:`complete`."""
        self._check_alive()
        if self._running[lane] is not None:
            return None
        try:
            if not self._start_job(lane):
                return None
            job = self._running[lane]
            self._running[lane] = None
            self._detached[lane] = job
            return job
        except BaseException as exc:
            self.fail(exc)
            raise

    def complete(self, job: Job) -> None:
        """Hand back a job from :meth:`next_job` once it is done."""
        self._check_alive()
        lane = job.lane
        if self._detached.get(lane) is not job or not job.done:
            raise MachineError(f"{type(job).__name__} handed back twice, early or unknown")
        self._detached[lane] = None
        try:
            self._complete(job)
        except BaseException as exc:
            self.fail(exc)
            raise

    def running_job(self, lane: Lane) -> Job | None:
        """The job a worker is running for ``lane`` (from :meth:`next_job`), if any."""
        return self._detached.get(lane)

    def _start_job(self, lane: Lane) -> bool:
        queue = self._queues[lane]
        if lane is Lane.DRAFT and self.state is MachineState.DEGRADED:
            queue.clear()
            self._closes[lane].clear()
            return False
        if queue:
            job = queue.popleft()
        elif self._closes[lane]:
            job = CloseJob(lane, ())
        else:
            return False
        if self._closes[lane]:
            job.attach_closes(self._closes[lane])
            self._closes[lane].clear()
        self._running[lane] = job
        return True

    # -- failure ----------------------------------------------------------------------

    def fault(self, lane: Lane, exc: BaseException) -> None:
        """A backend call on ``lane`` failed (it raised, returned bad logits or timed
        out). On the draft lane with ``on_draft_error="degrade"`` the lane is lost and
        generation continues target-only; otherwise the machine fails and ``exc`` is
        raised again."""
        if (
            lane is Lane.DRAFT
            and self.on_draft_error == "degrade"
            and self.state is MachineState.RUNNING
        ):
            self.lose_draft(exc)
            return
        self.fail(exc)
        raise exc

    def fail(self, exc: BaseException) -> None:
        """Move to ERROR (drivers call this when a backend raised)."""
        if self.state is not MachineState.ERROR:
            self.error = exc
            self._goto(MachineEvent.FAIL)

    def lose_draft(self, exc: BaseException) -> None:
        """The draft lane failed (an exception, bad logits or a timeout): drop its work
        and continue every sequence with plain target steps. Exact, since a target
        step needs no proposal; no committed token is lost. The draft's handles are
        listed in :attr:`orphans` for the driver to close if the draft still answers.
        """
        self._check_alive()
        if self.state is MachineState.DEGRADED:
            return
        log.warning(
            "the draft lane (%s) failed; continuing with target-only steps: %r",
            self._ctx.draft_name,
            exc,
        )
        try:
            self.draft_faults += 1
            self.orphans.extend(self.live_handles()[Lane.DRAFT])
            self._goto(MachineEvent.DRAFT_LOST)
            self._queues[Lane.DRAFT].clear()
            self._closes[Lane.DRAFT].clear()
            self._running[Lane.DRAFT] = None
            self._detached[Lane.DRAFT] = None
            self._outstanding[Lane.DRAFT] = None
            self._ready_request[Lane.DRAFT] = None
            rnd = self._round
            if rnd is not None:
                rnd.tree, rnd.tree_result, rnd.tree_done = None, None, True
            for s in self._seqs.values():
                s.speculates = False
                s.draft = None
                if s.stage is Stage.DRAFTING:
                    s.spec = NO_SPECULATION
                    self._move(s, SeqEvent.SPECULATED)
                elif s.stage is Stage.READY and s.spec is not None and s.spec.tokens:
                    s.spec = NO_SPECULATION
                elif s.stage is Stage.OPENING and s.target is not None:
                    self._after_open(s)
            self._maybe_resolve()
            self._maybe_start_round()
        except BaseException as err:
            self.fail(err)
            raise

    def _check_alive(self) -> None:
        if self.state is MachineState.ERROR:
            raise MachineError(f"the machine failed earlier: {self.error!r}")

    def _goto(self, event: MachineEvent) -> None:
        try:
            self.state = MACHINE_TRANSITIONS[(self.state, event)]
        except KeyError:
            raise InternalError(f"no machine transition from {self.state} on {event}") from None

    def _move(self, s: Seq, event: SeqEvent) -> None:
        try:
            s.stage = SEQUENCE_TRANSITIONS[(s.stage, event)]
        except KeyError:
            raise InternalError(
                f"sequence {s.sid}: no transition from {s.stage} on {event}"
            ) from None

    # -- what the driver and the engine read ------------------------------------------

    @property
    def idle(self) -> bool:
        """No live sequence and no work queued, running or outstanding."""
        return (
            not any(s.live for s in self._seqs.values())
            and not any(self._queues.values())
            and not any(self._closes.values())
            and all(j is None for j in self._running.values())
            and all(j is None for j in self._detached.values())
            and all(r is None for r in self._outstanding.values())
            and all(r is None for r in self._ready_request.values())
        )

    def pop_events(self) -> list[TokensCommitted | Finished]:
        """Tokens committed and sequences finished since the last call, in order."""
        out, self._events = self._events, []
        return out

    def sequence(self, sid: int) -> SequenceView:
        s = self._seqs[sid]
        return SequenceView(
            sid=s.sid,
            stream=s.stream,
            stage=s.stage,
            prompt_len=s.prompt_len,
            tokens=tuple(s.tokens),
            finish_reason=s.finish_reason,
            speculation=s.spec,
        )

    def sequences(self) -> list[SequenceView]:
        """Every sequence the machine still remembers, in the order they were added."""
        return [self.sequence(sid) for sid in self._seqs]

    def request_metrics(self, sid: int) -> RequestMetrics:
        s = self._seqs[sid]
        return RequestMetrics.of(s.counters, prompt_tokens=s.prompt_len)

    def metrics(self, *, driver: str, wall_s: float, batch_size: int | None = None) -> Metrics:
        return Metrics.of(
            self.counters,
            self.times,
            mode=self.mode,
            driver=driver,
            batch_size=self._next_sid if batch_size is None else batch_size,
            rounds=self.rounds,
            draft_faults=self.draft_faults,
            wall_s=wall_s,
        )

    def live_handles(self) -> dict[Lane, list[Handle]]:
        """Every handle the machine still holds or is about to close, per lane (for
        cleanup after a failure), including the handles a running job has made."""
        out: dict[Lane, list[Handle]] = {Lane.TARGET: [], Lane.DRAFT: []}
        for s in self._seqs.values():
            if s.target is not None:
                out[Lane.TARGET].append(s.target.handle)
            if s.draft is not None:
                out[Lane.DRAFT].append(s.draft.handle)
        for lane in Lane:
            out[lane].extend(self._closes[lane])
            for job in self._jobs_of(lane):
                out[lane].extend(job.pending_closes())
                if isinstance(job, (OpenJob, TreeJob)):
                    out[lane].extend(job.made())
        rnd = self._round
        if rnd is not None and rnd.tree_result is not None:
            out[Lane.DRAFT].extend(rnd.tree_result.handles())
        if self.state is MachineState.DEGRADED:
            out[Lane.DRAFT] = []
        return {lane: list(dict.fromkeys(hs)) for lane, hs in out.items()}

    def _jobs_of(self, lane: Lane) -> Iterator[Job]:
        for job in (self._running[lane], self._detached.get(lane)):
            if job is not None:
                yield job
        yield from self._queues[lane]

    # -- test hooks (documented in ssd_core.testing) ----------------------------------

    def snapshot(self) -> Hashable:
        """A hashable value that determines the machine's future outputs: the committed
        tokens, stage and speculation of every sequence (tokens, proposal rows as bytes,
        source), the queued work, and -- when the configuration adapts -- the estimates
        it adapts from. Handle numbers are left out (they change the work, never a
        token): two machines with equal snapshots have the same future distribution.
        """
        parts: list[Hashable] = [self.state.value]
        adaptive = self.mode == "ssd" and (
            isinstance(self.config.fanout, int)
            or isinstance(self.config.fanout_after_backup, int)
            or self.config.fallback == "auto"
        )
        for s in self._seqs.values():
            spec = None if s.spec is None else (s.spec.tokens, _row_bytes(s.spec.q), s.spec.source)
            seq_part: tuple[Hashable, ...] = (
                tuple(s.tokens),
                s.stage.value,
                s.finish_reason,
                spec,
            )
            if adaptive:
                seq_part += tuple(
                    (st.accepted, st.proposed, tuple(st.ranks)) for st in s.stats.values()
                )
            if self.config.adaptive and self.k:
                seq_part += (s.calib.state(), s.calib_fast.state())
            parts.append(seq_part)
        for lane in Lane:
            parts.append(tuple(type(j).__name__ for j in self._jobs_of(lane)))
        if adaptive and self.config.fallback == "auto":
            parts.append(
                (
                    tuple(self._jit_s),
                    tuple(self._round_s),
                    tuple((k, tuple(v)) for k, v in self._tokens_by_source.items()),
                    repr(attrs.asdict(self.counters)),
                )
            )
        return tuple(parts)

    def held(self) -> dict[tuple[int, Lane], tuple[Handle, tuple[int, ...]]]:
        """What the machine believes each sequence's handles hold: ``(sid, lane) ->
        (handle, tokens)``; a backend that keeps token lists can check the mirror."""
        out: dict[tuple[int, Lane], tuple[Handle, tuple[int, ...]]] = {}
        for s in self._seqs.values():
            if s.target is not None:
                out[(s.sid, Lane.TARGET)] = (s.target.handle, s.target.held)
            if s.draft is not None:
                out[(s.sid, Lane.DRAFT)] = (s.draft.handle, s.draft.held)
        return out

    def clone(self, source: RandomSource | None = None) -> Machine:
        """An independent copy (optionally with another random source): the exact
        enumerator branches the machine with it. Outstanding requests are copied too:
        deliver the copy's own :meth:`outstanding` request to it. The random source is
        shared with the copy (or replaced), never copied."""
        shared: dict[int, tuple[str, Any]] = {
            id(self._ctx.source): ("source", source if source is not None else self._ctx.source),
            id(self._ctx.ops): ("ops", self._ctx.ops),  # immutable; may hold closures
        }
        by_name = dict(shared.values())
        buf = io.BytesIO()
        pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
        pickler.persistent_id = lambda obj: shared[id(obj)][0] if id(obj) in shared else None  # type: ignore[method-assign]
        pickler.dump(self)
        buf.seek(0)
        unpickler = pickle.Unpickler(buf)
        unpickler.persistent_load = lambda pid: by_name[pid]  # type: ignore[method-assign]
        twin: Machine = unpickler.load()
        return twin

    # -- opening ----------------------------------------------------------------------

    def _enqueue_open(self, lane: Lane, s: Seq) -> None:
        queue = self._queues[lane]
        # A queued open that has not started takes the new prompt into its batch.
        for i, job in enumerate(queue):
            if isinstance(job, OpenJob):
                prompts = dict(job.prompts)
                prompts[s.sid] = tuple(s.tokens)
                queue[i] = OpenJob(self._ctx, lane, prompts)
                return
        queue.append(OpenJob(self._ctx, lane, {s.sid: tuple(s.tokens)}))

    def _on_opened(self, result: Opened) -> None:
        for sid, h in result.handles.items():
            s = self._seqs[sid]
            held = tuple(s.tokens[:-1])
            if result.lane is Lane.TARGET:
                s.target = TargetHandle(handle=h, held=held)
            elif self.state is MachineState.DEGRADED:
                self.orphans.append(h)
                continue
            else:
                s.draft = DraftHandle(handle=h, held=held)
            if s.stage is Stage.OPENING:
                self._after_open(s)

    def _after_open(self, s: Seq) -> None:
        if s.target is None or (s.speculates and s.draft is None):
            return  # the other lane's open is still running
        if self._spec_len(s) > 0 and self._wants_draft(s):
            self._move(s, SeqEvent.NEED_DRAFT)
            self._enqueue_draft(s)
        else:
            s.spec = NO_SPECULATION
            self._move(s, SeqEvent.SPECULATED)

    # -- just-in-time drafting --------------------------------------------------------

    def _enqueue_draft(self, s: Seq) -> None:
        queue = self._queues[Lane.DRAFT]
        item = self._draft_input(s)
        for i, job in enumerate(queue):
            if isinstance(job, DraftJob):
                queue[i] = DraftJob(self._ctx, (*job.seqs, item))
                return
        queue.append(DraftJob(self._ctx, (item,)))

    def _draft_input(self, s: Seq) -> DraftInput:
        assert s.draft is not None
        steps = self._spec_len(s)
        return DraftInput(
            sid=s.sid,
            stream=s.stream,
            round=s.rounds,
            tokens=tuple(s.tokens),
            params=s.params,
            draft=s.draft,
            steps=steps,
            saguaro_fan=self._saguaro_fan(s, backup=True, length=steps),
            table=s.calib.table() if self.config.adaptive else None,
            cost=self.cost if self.config.adaptive else None,
        )

    def _on_drafted(self, result: Drafted, busy_s: float) -> None:
        self._jit_s.append(busy_s)
        for sid, spec in result.specs.items():
            s = self._seqs[sid]
            s.draft = result.draft[sid]
            if s.stage is Stage.DRAFTING:
                s.spec = spec
                self._move(s, SeqEvent.SPECULATED)

    # -- rounds -----------------------------------------------------------------------

    def _maybe_start_round(self) -> None:
        if self._round is not None:
            return
        live = [s for s in self._seqs.values() if s.live]
        if any(s.stage is Stage.DRAFTING for s in live):
            return  # just-in-time drafts stall the batch (Saguaro Thm 17's trade-off)
        members = [s for s in live if s.stage is Stage.READY]
        if not members:
            return
        for s in members:
            self._move(s, SeqEvent.ROUND)
        verify = VerifyJob(
            self._ctx,
            [
                VerifyInput(
                    sid=s.sid,
                    stream=s.stream,
                    round=s.rounds,
                    tokens=tuple(s.tokens),
                    spec=s.spec if s.spec is not None else NO_SPECULATION,
                    params=s.params,
                    target=_present(s.target),
                )
                for s in members
            ],
        )
        self._queues[Lane.TARGET].append(verify)
        tree = None
        if self.mode == "ssd" and self.state is MachineState.RUNNING:
            # An empty speculation (a plain target step) still gets a tree: the draft's
            # guesses at the bonus token, so the next speculation needs no stall.
            inputs = [
                t for t in (self._tree_input(s) for s in members if s.speculates) if t is not None
            ]
            if inputs:
                tree = TreeJob(self._ctx, inputs)
                self._queues[Lane.DRAFT].append(tree)
        self._round = _Round(
            members=[s.sid for s in members], verify=verify, tree=tree, tree_done=tree is None
        )

    def _tree_input(self, s: Seq) -> TreeInput | None:
        if s.draft is None or s.spec is None:
            return None
        n = len(s.spec.tokens)
        steps = tuple(self._spec_len(s, extra=k + 1) for k in range(n + 1))
        if not any(steps):
            return None
        plan = self._fanout_for(s, s.spec.source, n, steps=max(steps))
        if not any(plan):
            return None
        return TreeInput(
            sid=s.sid,
            stream=s.stream,
            round=s.rounds,
            tokens=tuple(s.tokens),
            spec=s.spec,
            params=s.params,
            draft=s.draft,
            fanout=plan,
            steps=steps,
            saguaro_fan=self._saguaro_fan(s, backup=False, length=max(steps)),
        )

    def _on_verified(self, result: Verified) -> None:
        rnd = self._round
        assert rnd is not None
        rnd.verified = result
        for sid, t in result.target.items():
            self._seqs[sid].target = t
        if rnd.tree is not None and not rnd.tree_done:
            rnd.tree.prune(result.outcomes)
        self._maybe_resolve()

    def _on_tree(self, result: TreeResult) -> None:
        rnd = self._round
        assert rnd is not None
        rnd.tree_result = result
        rnd.tree_done = True
        for sid, d in result.draft.items():
            s = self._seqs[sid]
            if s.draft is not None:
                s.draft = d
        self._maybe_resolve()

    def _maybe_resolve(self) -> None:
        rnd = self._round
        if rnd is None or rnd.verified is None or not rnd.tree_done:
            return
        self._resolve(rnd)

    def _resolve(self, rnd: _Round) -> None:
        """Both lanes finished the round: commit, then find the next speculations."""
        assert rnd.verified is not None
        self._round = None
        self.rounds += 1
        self._round_s.append(max(rnd.verify.busy_s, rnd.tree.busy_s if rnd.tree else 0.0))
        tree = rnd.tree_result
        branches = tree.branches if tree is not None else ()
        used: set[int] = set()
        missed: list[Seq] = []
        if tree is not None:  # every rank this round needs, with at most one device read
            tree.prefetch_ranks(
                (sid, s.spec or NO_SPECULATION, rnd.verified.outcomes[sid])
                for sid in rnd.members
                if (s := self._seqs[sid]).live
            )
        for sid in rnd.members:
            s = self._seqs[sid]
            o = rnd.verified.outcomes[sid]
            spec = s.spec if s.spec is not None else NO_SPECULATION
            if not s.live:  # finished (cancelled) while the round ran
                continue
            self._count_round(s, spec, o, tree)
            s.rounds += 1
            self._commit(s, spec.tokens[: o.accepted] + (o.token,))
            if not s.live:
                continue
            n = self._spec_len(s)
            if n == 0:
                s.spec = NO_SPECULATION
                self._move(s, SeqEvent.SPECULATED)
                continue
            if self.mode == "sd" or self.state is not MachineState.RUNNING:
                self._jit_or_step(s)
                continue
            hit = self._lookup(s, spec, o, branches)
            if hit is not None and hit.complete and len(hit.tokens) >= n:
                xp = namespace(hit.raw[0])
                s.spec = self._worth_proposing(
                    s,
                    Speculation(
                        tokens=tuple(hit.tokens[:n]),
                        q=_stack(hit.q[:n]),
                        source="cache",
                        conf=(
                            tuple(hit.conf[:n])
                            if len(hit.conf) >= n
                            else tuple(confidence(xp.stack(hit.raw[:n])))
                        )
                        if self.config.adaptive
                        else (),
                    ),
                )
                self._move(s, SeqEvent.SPECULATED)
                # The hit branch already holds the new context and its draft rows: it
                # becomes the sequence's draft handle, so the next glue pass feeds 1
                # token. Only a sequence's own branch: a handle is never shared.
                if hit.sid == s.sid and id(hit) not in used:
                    used.add(id(hit))
                    assert s.draft is not None
                    self._closes[Lane.DRAFT].append(s.draft.handle)
                    first = len(hit.context) - 1
                    s.draft = DraftHandle(
                        handle=hit.handle,
                        held=hit.context + tuple(hit.tokens[:-1]),
                        rows={first + j: row for j, row in enumerate(hit.raw)},
                    )
            else:
                missed.append(s)
        for b in branches:
            if id(b) not in used and b.handle is not None:
                self._closes[Lane.DRAFT].append(b.handle)
        if missed:
            self._fallback(missed)
        self._release()
        self._maybe_start_round()

    def _jit_or_step(self, s: Seq) -> None:
        """Draft ``s``'s next speculation just in time, or -- when no drafting could
        pay -- make its next round a plain target step."""
        if self._wants_draft(s):
            s.spec = None
            self._move(s, SeqEvent.NEED_DRAFT)
            self._enqueue_draft(s)
        else:
            s.spec = NO_SPECULATION
            self._move(s, SeqEvent.SPECULATED)

    def _worth_proposing(self, s: Seq, spec: Speculation) -> Speculation:
        """A cached speculation cut to the positions worth verifying: decided from the
        rows' confidences, never from the tokens, so the cut is lossless."""
        if not self.config.adaptive or not spec.conf:
            return spec
        keep = keep_length(predict_from(s.calib.table(), spec.conf), self.cost, drafting=False)
        return spec.truncated(keep)

    def _lookup(
        self, s: Seq, spec: Speculation, o: Outcome, branches: Sequence[Branch]
    ) -> Branch | None:
        c = s.counters
        c.cache_lookups += 1
        self.counters.cache_lookups += 1
        after = "primary" if spec.source == "cache" else "backup"
        _bump(c, self.counters, f"lookups_after_{after}")
        hit = self._ctx.ops.lookup(branches, s.sid, o)
        if hit is not None:
            if not hit.complete:
                raise InternalError("a cached branch was used before it was complete")
            _bump(c, self.counters, "cache_hits")
            _bump(c, self.counters, f"hits_after_{after}")
        return hit

    def _count_round(self, s: Seq, spec: Speculation, o: Outcome, tree: TreeResult | None) -> None:
        for c in (s.counters, self.counters):
            c.sequence_rounds += 1
            if not o.proposed:
                continue
            c.proposed_tokens += o.proposed
            c.accepted_tokens += o.accepted
            c.rejections += int(o.rejected)
            c.speculated_rounds += 1
            if spec.source == "cache":
                c.accepted_on_hit += o.accepted
                c.rounds_on_hit += 1
            else:
                c.accepted_on_miss += o.accepted
                c.rounds_on_miss += 1
        if not o.proposed:
            return
        if spec.conf:
            calib = s.calib_fast if spec.source == "fast" else s.calib
            calib.observe(spec.conf, o.accepted, o.proposed)
        if spec.source in self._tokens_by_source:
            self._tokens_by_source[spec.source].append(o.accepted + 1)
        rank = tree.rank(s.sid, spec, o) if tree is not None else None
        group = "primary" if spec.source == "cache" else "backup"
        s.stats[group].observe(o.accepted, o.proposed, rank)

    def _fallback(self, missed: list[Seq]) -> None:
        kind: str = self.config.fallback
        if kind == "auto":
            kind = self._auto_fallback(len(missed), sum(1 for s in self._seqs.values() if s.live))
        for s in missed:
            s.counters.add_fallback(kind)
            self.counters.add_fallback(kind)
            if kind == "neural":
                self._jit_or_step(s)
            else:
                toks, matched = fast_backup(s.tokens, self._spec_len(s))
                conf = (FAST_CONFIDENCE[min(matched, len(FAST_CONFIDENCE) - 1)],) * len(toks)
                s.spec = Speculation(tokens=toks, q=None, source="fast", conf=conf)
                if self.config.adaptive:
                    table = s.calib_fast.table()
                    keep = keep_length(predict_from(table, conf), self.cost, drafting=False)
                    s.spec = s.spec.truncated(keep)
                self._move(s, SeqEvent.SPECULATED)

    def _commit(self, s: Seq, tokens: Sequence[int]) -> None:
        new: list[int] = []
        for t in tokens:
            s.tokens.append(t)
            new.append(t)
            gen = len(s.tokens) - s.prompt_len
            if t in s.stop_ids or any(
                gen >= len(seq) and tuple(s.tokens[-len(seq) :]) == seq
                for seq in s.params.stop_sequences
            ):
                self._emit_tokens(s, new)
                self._finish(s, "stop")
                return
            # A handle holds all but the last committed token: C + 1 tokens fill it.
            if gen >= s.max_new or (
                self.target_context is not None and len(s.tokens) > self.target_context
            ):
                self._emit_tokens(s, new)
                self._finish(s, "length")
                return
        self._emit_tokens(s, new)

    def _emit_tokens(self, s: Seq, new: list[int]) -> None:
        if new:
            s.counters.generated_tokens += len(new)
            self.counters.generated_tokens += len(new)
            self._events.append(TokensCommitted(sid=s.sid, tokens=tuple(new)))

    def _finish(self, s: Seq, reason: str) -> None:
        self._move(s, SeqEvent.FINISH)
        s.finish_reason = reason
        s.spec = None
        self._events.append(Finished(sid=s.sid, reason=reason))

    def _release(self) -> None:
        """Close the handles of finished sequences no job is using any more."""
        busy: set[int] = set()
        for lane in Lane:
            for job in self._jobs_of(lane):
                busy.update(_sids_of(job))
        if self._round is not None:
            busy.update(self._round.members)
        for s in self._seqs.values():
            if s.stage is not Stage.FINISHED or s.sid in busy:
                continue
            if s.target is not None:
                self._closes[Lane.TARGET].append(s.target.handle)
            if s.draft is not None:
                if self.state is MachineState.DEGRADED:
                    self.orphans.append(s.draft.handle)
                else:
                    self._closes[Lane.DRAFT].append(s.draft.handle)
            s.target = s.draft = None
            self._move(s, SeqEvent.RELEASED)

    # -- applying a finished job ------------------------------------------------------

    def _complete(self, job: Job) -> None:
        self._record_times(job)
        result = job.result()
        if isinstance(result, Opened):
            self._on_opened(result)
        elif isinstance(result, Drafted):
            self._on_drafted(result, job.busy_s)
        elif isinstance(result, Verified):
            self._on_verified(result)
        elif isinstance(result, TreeResult):
            self._on_tree(result)
        self._release()
        self._maybe_start_round()

    def _record_times(self, job: Job) -> None:
        t = self.times
        for kind, elapsed, rows in job.elapsed:
            if kind in self._fits and rows:
                self._fits[kind].add(rows, elapsed)
            if job.lane is Lane.TARGET:
                t.target_busy_s += elapsed
            else:
                t.draft_busy_s += elapsed
            name = {"draft": "jit_draft", "tree": "tree_step"}.get(kind, kind)
            setattr(t, f"{name}_total_s", getattr(t, f"{name}_total_s") + elapsed)
            setattr(t, f"{name}_calls", getattr(t, f"{name}_calls") + 1)
            if kind in ("verify", "draft", "glue", "tree"):
                if job.lane is Lane.TARGET:
                    t.target_passes += 1
                else:
                    t.draft_passes += 1

    # -- policies ---------------------------------------------------------------------

    def _spec_len(self, s: Seq, extra: int = 0) -> int:
        """Draft tokens worth proposing for ``s`` once ``extra`` more tokens are
        committed: at most K, never more than it can still commit, within both
        contexts. 0 means a plain target step."""
        if not s.speculates or self.k == 0:
            return 0
        n = len(s.tokens) + extra
        k = min(self.k, s.remaining - extra - 1)
        if self.target_context is not None:
            k = min(k, self.target_context - n)
        if self.draft_context is not None:
            room = self.draft_context - n
            k = min(k, room // 2 if self.mode == "ssd" else room)
        return max(k, 0)

    @property
    def cost(self) -> CostModel:
        """The costs the speculation-length policy plans with (see ``SSDConfig.cost``)."""
        if self.config.cost != "measured":
            return self._declared
        verify, draft = self._fits["verify"].line(), self._fits["draft"].line()
        d = self._declared
        return CostModel(
            verify_call=verify[0] if verify else d.verify_call,
            verify_row=verify[1] if verify else d.verify_row,
            draft_call=draft[0] if draft else d.draft_call,
            draft_row=draft[1] if draft else d.draft_row,
            draft_prefill_row=d.draft_prefill_row,
        )

    def _wants_draft(self, s: Seq) -> bool:
        """Whether just-in-time drafting could pay for ``s`` at all."""
        return not self.config.adaptive or worth_drafting(self.cost)

    def _fanout_for(
        self, s: Seq, source: str, n: int, *, steps: int | None = None
    ) -> tuple[int, ...]:
        """F_0..F_n for a tree predicting the outcome of an n-token speculation whose
        branches decode ``steps`` tokens (default n)."""
        backup = source != "cache"
        value = self.config.fanout
        if backup and self.config.fanout_after_backup is not None:
            value = self.config.fanout_after_backup
        if isinstance(value, tuple):
            return value if n == self.k else value[:n] + (value[self.k],)
        stats = s.stats["backup" if backup else "primary"]
        if self.config.adaptive:  # the budget is a cap; Thm 7 picks what pays
            r = stats.power_law_r
            hit = hit_curve(stats.ranks, r)
            value = choose_budget(
                stats.outcome_probs(n), hit, r, n, self.cost, value, steps=steps,
                overlap=self.overlap,
            )  # fmt: skip
        return stats.plan(value, n) if n else (value,)

    def _saguaro_fan(self, s: Seq, *, backup: bool, length: int) -> tuple[int, ...]:
        """The F used to down-weight draft tokens under Saguaro sampling: the fan-out
        the *next* round's tree will cache at each position."""
        c = saguaro_c_for(self._ctx, s.params.effective_draft_temperature)
        if c >= 1.0 or length <= 0:
            return (0,) * max(length, 0)
        return self._fanout_for(s, "neural" if backup else "cache", length)[:length]

    def _auto_fallback(self, missed: int, live: int) -> str:
        """Saguaro Thm 17: neural when its extra accepted tokens are worth the stall.

        Neural drafting stalls the whole batch for about ``T_jit``; it is worth it when
        ``missed * (E_neural - E_fast) / T_jit`` beats the batch's current throughput
        ``live * E_round / T_round``. Before anything was measured, neural.
        """
        if not self._jit_s or not self._round_s:
            return "neural"
        t_jit = float(np.mean(self._jit_s))
        t_round = float(np.mean(self._round_s)) or 1e-9
        c = self.counters
        a = c.accepted_tokens / (c.accepted_tokens + c.rejections) if c.rejections else 0.5
        e_neural_prior = sum(a**j for j in range(self.k + 1))
        neural, fast = self._tokens_by_source["neural"], self._tokens_by_source["fast"]
        e_neural = float(np.mean(neural)) if neural else e_neural_prior
        e_fast = float(np.mean(fast)) if fast else 1.0
        e_round = (c.generated_tokens / c.sequence_rounds) if c.sequence_rounds else e_neural
        gain_rate = missed * (e_neural - e_fast) / max(t_jit, 1e-9)
        return "neural" if gain_rate > live * e_round / t_round else "fast"


def _sids_of(job: Job) -> list[int]:
    if isinstance(job, OpenJob):
        return list(job.prompts)
    seqs = getattr(job, "seqs", ())
    return [s.sid for s in seqs]


def _bump(a: Counters, b: Counters, name: str) -> None:
    setattr(a, name, getattr(a, name) + 1)
    setattr(b, name, getattr(b, name) + 1)


def _present(t: TargetHandle | None) -> TargetHandle:
    if t is None:
        raise InternalError("a sequence joined a round before its target handle was open")
    return t


def _row_bytes(x: Any) -> bytes:
    return b"" if x is None else np.ascontiguousarray(to_host(x), dtype=np.float64).tobytes()
