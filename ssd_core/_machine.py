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

import numpy as np

from ._config import SamplingParams, SSDConfig
from ._errors import InternalError, MachineError
from ._events import Extend, Lane, Request
from ._fanout import OutcomeStats
from ._jobs import _CloseJob, _DraftJob, _Job, _OpenJob, _TreeJob, _VerifyJob
from ._math import namespace
from ._metrics import Metrics, MetricsRecorder
from ._protocol import Handle
from ._random import RandomSource
from ._sequence import Speculation, _Seq, fast_backup_tokens

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
