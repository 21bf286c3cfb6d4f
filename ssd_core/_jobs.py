"""The machine's jobs: one lane's work, one request at a time.

A job is built by the :class:`~ssd_core.Machine` from *frozen inputs* (a snapshot of
the sequences it serves) and a frozen :class:`JobContext`; it emits requests
(:mod:`ssd_core._requests`) through :meth:`Job.next`, consumes their results through
:meth:`Job.receive`, and when done holds a typed *result* (:class:`Opened`,
:class:`Drafted`, :class:`Verified`, :class:`TreeResult`) that the machine applies. A
job never sees the machine and never writes a sequence, so a driver may run a whole
job on a lane's worker thread.

The tree job's stages change only through :data:`TREE_TRANSITIONS`.

Host reads. On a GPU every value read back blocks the host, so a job reads back once
per request it receives: the logits' finiteness check, the ids it must act on (sampled
tokens, accepted counts, tree candidates) and a few floats travel together in one
:func:`~ssd_core._math.fetch`. What the host must send (uniforms, indices, per-row
parameters) goes up in one non-blocking upload per request. With a source that offers
uniforms (:func:`~ssd_core._random.uniform_draws`) a verification is one read and a
tree or draft step one read; other sources (the enumerating one) get their protocol
calls, in the same order as ever, with the reads those need.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import array_api_compat
import attrs
import numpy as np

from ._config import SamplingParams
from ._errors import BackendContractError, InternalError
from ._fanout import default_saguaro_c
from ._math import (
    accept_probabilities,
    check_shape,
    count_above,
    count_above_many,
    draft_weights,
    fetch,
    finite_flag,
    logits_error,
    move_like,
    namespace,
    pick_top,
    rank_from,
    residual_weights,
    target_probs,
    to_host,
    top_candidates,
    top_ids,
    upload,
)
from ._policy import CostModel, confidence, confidence_rows, predict_from
from ._protocol import Handle
from ._random import Key, RandomSource, Stream, inverse_cdf, uniform_draws
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
        accept_probabilities: ``(p, q, tokens) -> min(1, p(d)/q(d))`` per row (an
            array in p's namespace, or host floats); row-wise, so the rows of every
            speculation in a verification may come in one call.
        residual_weights: ``(p, q) -> max(0, p - q)`` per row (p where it has no
            mass); called with one row or with rows.
        lookup: ``(branches, sid, outcome) -> branch or None``: the cached branch
            that serves ``outcome`` of sequence ``sid``.
    """

    target_probs: Callable[[Any, Sequence[SamplingParams], Any], Any] = _default_target_probs
    draft_weights: Callable[[Any, Sequence[float], Sequence[int], float], Any] = draft_weights
    accept_probabilities: Callable[[Any, Any, Sequence[int]], Any] = accept_probabilities
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
    #: Saguaro's C for every row, or ``None``: per row from its draft temperature
    #: (:func:`~ssd_core.default_saguaro_c`).
    saguaro_c: float | None
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


def _rows(xp: Any, x: Any, index: Sequence[int]) -> Any:
    """Rows ``index`` of ``x``: a view when they are consecutive, else one gather (its
    index uploaded without blocking the host)."""
    n = len(index)
    if n and all(index[j] == index[0] + j for j in range(n)):
        return x if index[0] == 0 and n == x.shape[0] else x[index[0] : index[0] + n]
    return xp.take(x, upload(np.asarray(index, dtype=np.int64), x), axis=0)


def _validate(
    ctx: JobContext, lane: Lane, logits: Any, rows: int, what: str, *, defer: bool
) -> Any:
    """Check a backend's logits. Shape and dtype now; finiteness now on the host, or --
    on a device with ``defer`` -- as a flag to fetch with the job's results (returned;
    ``None`` when already checked). See :func:`_fetch_checked`."""
    check_shape(logits, rows, ctx.vocab_size, who=ctx.name(lane), what=what)
    if not rows:
        return None
    flag = finite_flag(logits)
    if defer and not isinstance(logits, np.ndarray):
        return flag
    if not bool(flag):
        raise logits_error(ctx.name(lane), what)
    return None


def _fetch_checked(
    ctx: JobContext, lane: Lane, what: str, parts: Sequence[Any], flag: Any
) -> list[np.ndarray]:
    """``parts`` on the host in one transfer, with the deferred finiteness flag (raises
    before anything is used if it is down)."""
    host = fetch([*parts, flag] if flag is not None else list(parts))
    if flag is not None and not bool(host.pop()):
        raise logits_error(ctx.name(lane), what)
    return host


def _as_array(values: Any, like: Any) -> Any:
    """An op's result as an array like ``like`` (host floats -- a list, or a numpy
    array from an op that computed on the host -- are uploaded)."""
    if hasattr(values, "shape") and (
        not isinstance(values, np.ndarray) or isinstance(like, np.ndarray)
    ):
        return values
    return upload(np.asarray(values, dtype=np.float64), like)


class _Draws:
    """One draft token per row, drawn on the rows' device from the source's uniforms
    (a greedy row takes its lowest argmax: no draw). Fetch :attr:`parts`, then read the
    tokens with :meth:`tokens`; :attr:`q` holds each row's weights (``None``: greedy)."""

    def __init__(
        self,
        ctx: JobContext,
        rows: Any,
        temperatures: Sequence[float],
        fanouts: Sequence[int],
        keys: Sequence[Key],
        uniforms: Callable[[Sequence[Key]], list[float]],
    ) -> None:
        xp = namespace(rows)
        self.greedy = [i for i, t in enumerate(temperatures) if t == 0.0]
        self.sampled = [i for i, t in enumerate(temperatures) if t != 0.0]
        self.q: list[Any] = [None] * len(temperatures)
        self.parts: list[Any] = []
        if self.greedy:
            sub = rows if not self.sampled else _rows(xp, rows, self.greedy)
            self.parts.append(xp.argmax(sub, axis=1))
        if self.sampled:
            sub = rows if not self.greedy else _rows(xp, rows, self.sampled)
            w = _draft_weights(
                ctx,
                sub,
                [temperatures[i] for i in self.sampled],
                [fanouts[i] for i in self.sampled],
            )
            self.parts.append(inverse_cdf(w, uniforms([keys[i] for i in self.sampled])))
            for j, i in enumerate(self.sampled):
                self.q[i] = w[j]

    def tokens(self, host: Sequence[np.ndarray]) -> list[int]:
        out = [0] * len(self.q)
        at = 0
        for index in (self.greedy, self.sampled):
            if index:
                for i, t in zip(index, host[at]):
                    out[i] = int(t)
                at += 1
        return out


def saguaro_c_for(ctx: JobContext, temperature: float) -> float:
    """The Saguaro constant C of a row drafted at ``temperature``."""
    return ctx.saguaro_c if ctx.saguaro_c is not None else default_saguaro_c(temperature)


def _draft_weights(
    ctx: JobContext, rows: Any, temperatures: Sequence[float], fanouts: Sequence[int]
) -> Any:
    """The q rows the draft samples from, each with its own Saguaro C: one call when
    the rows share it (the usual case), else one per C, put back in row order."""
    cs = [saguaro_c_for(ctx, t) for t in temperatures]
    if len(set(cs)) <= 1:
        return ctx.ops.draft_weights(rows, temperatures, fanouts, cs[0] if cs else 1.0)
    xp = namespace(rows)
    groups: dict[float, list[int]] = {}
    for i, c in enumerate(cs):
        groups.setdefault(c, []).append(i)
    parts, order = [], []
    for c, index in groups.items():
        parts.append(
            ctx.ops.draft_weights(
                _rows(xp, rows, index),
                [temperatures[i] for i in index],
                [fanouts[i] for i in index],
                c,
            )
        )
        order += index
    where = np.argsort(np.asarray(order, dtype=np.int64), kind="stable")
    return _rows(xp, xp.concat(parts, axis=0), [int(i) for i in where])


def _draft_tokens(
    ctx: JobContext,
    rows: Any,
    temperatures: Sequence[float],
    fanouts: Sequence[int],
    keys: Sequence[Key],
) -> tuple[list[int], list[Any]]:
    """Draw one draft token per row through the source's protocol calls: (tokens, the
    q row each was drawn from, ``None`` for a greedy row). A greedy row's token is its
    lowest argmax -- a point mass, so there is nothing to draw and no row to keep (the
    verifier treats ``q=None`` as point masses)."""
    xp = namespace(rows)
    greedy = [i for i, t in enumerate(temperatures) if t == 0.0]
    sampled = [i for i, t in enumerate(temperatures) if t != 0.0]
    tokens: list[int] = [0] * len(temperatures)
    q: list[Any] = [None] * len(temperatures)
    if greedy:
        sub = rows if not sampled else _rows(xp, rows, greedy)
        for i, t in zip(greedy, to_host(xp.argmax(sub, axis=1))):
            tokens[i] = int(t)
    if sampled:
        sub = rows if not greedy else _rows(xp, rows, sampled)
        w = _draft_weights(
            ctx, sub, [temperatures[i] for i in sampled], [fanouts[i] for i in sampled]
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
        uniforms = uniform_draws(ctx.source)
        # Each sequence's K_i + 1 needed rows, by their row in ``logits``.
        blocks: list[list[int]] = []
        offset = 0
        for s, (_, _, feed) in zip(self.seqs, request.items):
            n = len(s.spec.tokens) + 1
            offset += len(feed)
            blocks.append(list(range(offset - n, offset)))
        greedy = [i for i, s in enumerate(self.seqs) if s.params.temperature == 0.0]
        sampled = [i for i, s in enumerate(self.seqs) if s.params.temperature != 0.0]
        logits = result
        flag = _validate(
            ctx,
            Lane.TARGET,
            logits,
            request.rows,
            "verification",
            defer=uniforms is not None or not sampled,
        )
        xp = namespace(logits)
        outcomes: dict[int, Outcome] = {}
        parts: list[Any] = []
        finishers: list[tuple[int, Callable[[list[np.ndarray]], dict[int, Outcome]]]] = []
        if greedy:
            g_parts, g_finish = self._greedy(
                xp, logits, [self.seqs[i] for i in greedy], [blocks[i] for i in greedy]
            )
            parts += g_parts
            finishers.append((len(g_parts), g_finish))
        if sampled:
            seqs, blks = [self.seqs[i] for i in sampled], [blocks[i] for i in sampled]
            if uniforms is None:
                outcomes.update(self._sampled(xp, logits, seqs, blks))
            else:
                s_parts, s_finish = self._sampled_fast(xp, logits, seqs, blks, uniforms)
                parts += s_parts
                finishers.append((len(s_parts), s_finish))
        host = _fetch_checked(ctx, Lane.TARGET, "verification", parts, flag)
        at = 0
        for n_parts, finish in finishers:
            outcomes.update(finish(host[at : at + n_parts]))
            at += n_parts
        self._outcomes = {s.sid: outcomes[s.sid] for s in self.seqs}
        self.outcomes = self._outcomes

    @staticmethod
    def _greedy(
        xp: Any, logits: Any, seqs: list[VerifyInput], blocks: list[list[int]]
    ) -> tuple[list[Any], Callable[[list[np.ndarray]], dict[int, Outcome]]]:
        """Temperature 0: the processed target is one-hot at the lowest argmax, so draft
        token d_i is accepted with probability 1 iff it is that argmax and 0 otherwise,
        and the recovery or bonus token is the argmax itself -- for any proposal q. No
        probabilities and no draws are needed; only the argmaxes cross to the host."""
        rows = _rows(xp, logits, [r for b in blocks for r in b])

        def finish(host: list[np.ndarray]) -> dict[int, Outcome]:
            best = [int(t) for t in host[0]]
            out, at = {}, 0
            for s, b in zip(seqs, blocks):
                a = 0
                while a < len(s.spec.tokens) and s.spec.tokens[a] == best[at + a]:
                    a += 1
                out[s.sid] = Outcome(accepted=a, token=best[at + a], proposed=len(s.spec.tokens))
                at += len(b)
            return out

        return [xp.argmax(rows, axis=1)], finish

    def _target_rows(
        self, xp: Any, logits: Any, seqs: list[VerifyInput], blocks: list[list[int]]
    ) -> Any:
        """The processed target rows of every block, stacked."""
        picks: list[int] = []
        params: list[SamplingParams] = []
        positions: list[int] = []
        for s, b in zip(seqs, blocks):
            picks.extend(b)
            params.extend([s.params] * len(b))
            positions.extend(range(len(b)))
        return self.ctx.ops.target_probs(_rows(xp, logits, picks), params, tuple(positions))

    def _sampled_fast(
        self,
        xp: Any,
        logits: Any,
        seqs: list[VerifyInput],
        blocks: list[list[int]],
        uniforms: Callable[[Sequence[Key]], list[float]],
    ) -> tuple[list[Any], Callable[[list[np.ndarray]], dict[int, Outcome]]]:
        """Rejection sampling for every sequence at once, on the logits' device.

        Every accept test of the block is compared with its uniform in one go; the
        first rejection per sequence, its residual (or the bonus row) and the recovery
        or bonus token are found on the device, so the only read is (accepted, token)
        per sequence. The draws are the protocol's, realised from the same uniforms:
        ``("accept", stream, round, i)`` for position i (uniforms past the first
        rejection are derived but decide nothing) and ``("token", stream, round)``.
        """
        ops = self.ctx.ops
        p = self._target_rows(xp, logits, seqs, blocks)
        n = len(seqs)
        ks = [len(s.spec.tokens) for s in seqs]
        kmax, total = max(ks), sum(ks)
        starts = list(itertools.accumulate([k + 1 for k in ks], initial=0))[:-1]
        keys: list[Key] = [
            ("accept", s.stream, s.round, j) for s in seqs for j in range(len(s.spec.tokens))
        ]
        keys += [("token", s.stream, s.round) for s in seqs]
        u = np.asarray(uniforms(keys), dtype=np.float64)
        # One upload for the whole job: uniforms (padded per sequence with 2.0, which no
        # probability is above, so padding always reads as a rejection), indices, tokens.
        u_acc = np.full((n, kmax), 2.0)
        acc_at = np.zeros((n, kmax), dtype=np.int64)
        q_at = np.zeros(n, dtype=np.int64)
        at = 0
        for i, k in enumerate(ks):
            u_acc[i, :k] = u[at : at + k]
            acc_at[i, :k] = np.arange(at, at + k)
            q_at[i] = at if k else 0
            at += k
        tokens = [t for s in seqs for t in s.spec.tokens]
        sizes = (n * kmax, n, n * kmax, n, n, n, total)
        host = np.concatenate(
            [u_acc.ravel(), u[total:], acc_at.ravel(), starts, q_at, ks, tokens]
        ).astype(np.float64)
        up = upload(host, p)
        pieces, o = [], 0
        for size in sizes:
            pieces.append(up[o : o + size])
            o += size
        u_acc_d, u_tok_d = xp.reshape(pieces[0], (n, kmax)), pieces[1]
        acc_at_d, starts_d, q_at_d, ks_d, tok_d = (xp.astype(x, xp.int64) for x in pieces[2:])

        on_host = isinstance(p, np.ndarray)
        q_all: Any = None
        q_seq: list[Any] = []
        if kmax and on_host:
            # On the host there is no read to save: one call per sequence, on views of
            # p (no gathered copy of its rows), as the protocol path does.
            q_seq = [self._proposal(xp, p, s) if k else None for s, k in zip(seqs, ks)]
            acc = np.concatenate(
                [
                    np.asarray(
                        _as_array(ops.accept_probabilities(p[st : st + k], q, s.spec.tokens), p),
                        dtype=np.float64,
                    )
                    for s, st, k, q in zip(seqs, starts, ks, q_seq)
                    if k
                ]
            )
        elif kmax:
            q_all = self._proposals(xp, p, seqs, tok_d)
            p_spec = _rows(xp, p, [r for st, k in zip(starts, ks) for r in range(st, st + k)])
            acc = _as_array(ops.accept_probabilities(p_spec, q_all, tokens), p)
        if kmax:
            acc_pad = xp.reshape(xp.take(acc, acc_at_d, axis=0), (n, kmax))
            ok = xp.astype(u_acc_d < acc_pad, xp.int64)
            pad = xp.zeros((n, 1), dtype=xp.int64, device=_device(ok))
            # the first 0 of each row (argmin takes the first of equal minima)
            a = xp.argmin(xp.concat([ok, pad], axis=1), axis=1)
        else:
            a = xp.zeros((n,), dtype=xp.int64, device=_device(p))
        p_last = xp.take(p, starts_d + a, axis=0)
        if not kmax:
            last = p_last
        elif on_host:  # residuals for the rejected rows only
            last = p_last
            rej = np.flatnonzero(a < np.asarray(ks))
            if rej.size:
                q_rej = np.stack([q_seq[i][a[i]] for i in rej])
                last[rej] = ops.residual_weights(p_last[rej], q_rej)
        else:
            q_sel = xp.take(
                q_all, q_at_d + xp.minimum(a, xp.maximum(ks_d - 1, xp.zeros_like(ks_d))), axis=0
            )
            resid = ops.residual_weights(p_last, q_sel)
            last = xp.where((a < ks_d)[:, None], resid, p_last)
        token = inverse_cdf(last, u_tok_d)

        def finish(host: list[np.ndarray]) -> dict[int, Outcome]:
            acc_h, tok_h = host
            return {
                s.sid: Outcome(accepted=int(acc_h[i]), token=int(tok_h[i]), proposed=ks[i])
                for i, s in enumerate(seqs)
            }

        return [a, token], finish

    def _proposal(self, xp: Any, p: Any, s: VerifyInput) -> Any:
        """One speculation's q rows where p lives (one-hot rows for point masses)."""
        if s.spec.q is not None:
            return move_like(s.spec.q, p)
        cols = xp.arange(self.ctx.vocab_size, device=_device(p))
        toks = upload(np.asarray(s.spec.tokens, dtype=np.int64), p)
        return xp.astype(cols[None, :] == toks[:, None], xp.float64)

    def _proposals(self, xp: Any, p: Any, seqs: list[VerifyInput], tok_d: Any) -> Any:
        """Every speculation's q rows, stacked on p's device: the draft's rows (moved
        device to device), one-hot rows for point masses (fast backup tokens, a greedy
        draft)."""
        parts: list[Any] = []
        onehot = None
        at = 0
        for s in seqs:
            k = len(s.spec.tokens)
            if not k:
                continue
            if s.spec.q is None:
                if onehot is None:
                    cols = xp.arange(self.ctx.vocab_size, device=_device(p))
                    onehot = xp.astype(cols[None, :] == tok_d[:, None], xp.float64)
                parts.append(onehot[at : at + k])
            else:
                parts.append(move_like(s.spec.q, p))
            at += k
        if len(parts) == 1:
            return parts[0]
        if len({x.dtype for x in parts}) > 1:
            parts = [xp.astype(x, xp.float64) for x in parts]
        return xp.concat(parts, axis=0)

    def _sampled(
        self, xp: Any, logits: Any, seqs: list[VerifyInput], blocks: list[list[int]]
    ) -> dict[int, Outcome]:
        """Rejection sampling through the source's protocol calls (a source without
        uniforms: the enumerating one), one position at a time so a rejection ends the
        draws."""
        ctx, ops = self.ctx, self.ctx.ops
        p = self._target_rows(xp, logits, seqs, blocks)

        starts, at = [], 0
        q_rows: list[Any] = []
        for s in seqs:
            starts.append(at)
            k = len(s.spec.tokens)
            at += k + 1
            # Point masses (fast backup tokens, a greedy draft) get one-hot rows.
            q_rows.append(self._proposal(xp, p, s) if k else None)
        accept_p = [
            [
                float(x)
                for x in to_host(
                    _as_array(
                        ops.accept_probabilities(p[st : st + len(s.spec.tokens)], q, s.spec.tokens),
                        p,
                    )
                )
            ]
            if s.spec.tokens
            else []
            for s, st, q in zip(seqs, starts, q_rows)
        ]
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
        uniforms = uniform_draws(ctx.source)
        logits = result
        flag = _validate(
            ctx, Lane.DRAFT, logits, request.rows, "drafting", defer=uniforms is not None
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
        picked = _rows(xp, logits, last)
        temps = [s.params.effective_draft_temperature for s in self._active]
        fans = [s.saguaro_fan[self.step] for s in self._active]
        keys: list[Key] = [("neural", s.stream, s.round, self.step) for s in self._active]
        if uniforms is not None and not isinstance(picked, np.ndarray):
            # On a device, confidences and tokens in one read: every active row draws,
            # and a row that is not worth proposing (decided from its confidence, never
            # from its token) drops its token unseen -- the same as not drawing it.
            draws = _Draws(ctx, picked, temps, fans, keys, uniforms)
            host = _fetch_checked(
                ctx, Lane.DRAFT, "drafting", [confidence_rows(picked), *draws.parts], flag
            )
            conf = [float(c) for c in host[0]]
            go = [i for i, s in enumerate(self._active) if self._proposes(s, conf[i])]
            drawn = dict(enumerate(draws.tokens(host[1:])))
            q = dict(enumerate(draws.q))
        else:
            # Decide from the rows -- before drawing -- which sequences propose this
            # position; only those draw (host rows: no read to save by drawing early).
            conf = confidence(picked)
            go = [i for i, s in enumerate(self._active) if self._proposes(s, conf[i])]
            drawn, q = {}, {}
            if go:
                sub = picked if len(go) == len(self._active) else _rows(xp, picked, go)
                sub_t, sub_f = [temps[i] for i in go], [fans[i] for i in go]
                sub_k = [keys[i] for i in go]
                if uniforms is not None:
                    few = _Draws(ctx, sub, sub_t, sub_f, sub_k, uniforms)
                    toks, rows_q = few.tokens(fetch(few.parts)), few.q
                else:
                    toks, rows_q = _draft_tokens(ctx, sub, sub_t, sub_f, sub_k)
                drawn, q = dict(zip(go, toks)), dict(zip(go, rows_q))
        if len(go) < len(self._active):
            self._stopped.update(s.sid for i, s in enumerate(self._active) if i not in go)
        for i in go:
            s = self._active[i]
            self._tokens[s.sid].append(drawn[i])
            self._rows[s.sid].append(q[i])
            self._conf[s.sid].append(conf[i])
        self._active = [self._active[i] for i in go]
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
    ``tokens`` and ``q`` are the sampled speculation, ``raw`` its raw draft rows and
    ``conf`` their confidences (read with the tokens for device rows; empty for host
    rows, whose confidence costs nothing to compute later)."""

    sid: int
    k: int
    token: int
    context: tuple[int, ...]
    steps: int
    handle: Handle = None
    tokens: list[int] = attrs.field(factory=list)
    q: list[Any] = attrs.field(factory=list)
    raw: list[Any] = attrs.field(factory=list)
    conf: list[float] = attrs.field(factory=list)

    @property
    def complete(self) -> bool:
        return len(self.tokens) == self.steps


@attrs.frozen
class Candidates:
    """A block of glue rows' top entries, read back once (host arrays): ``vals[k]``,
    ``ids[k]`` for row g_k, in no order; ``complete`` when they are the whole rows."""

    vals: np.ndarray
    ids: np.ndarray
    complete: bool


@attrs.frozen
class TreeResult:
    """Result of a :class:`TreeJob`."""

    #: Rows g_0..g_{K_i} per sequence (for the rank of the realised outcome).
    glue: dict[int, Any]
    #: Each sequence's draft handle after the glue pass.
    draft: dict[int, DraftHandle]
    branches: tuple[Branch, ...]
    #: The glue rows' top entries per sequence, for device rows (ranks from the host).
    cands: dict[int, Candidates] = attrs.field(factory=dict)
    _ranks: dict[tuple[int, int, int], int] = attrs.field(factory=dict, init=False)

    def handles(self) -> list[Handle]:
        return [b.handle for b in self.branches if b.handle is not None]

    def rank(self, sid: int, spec: Speculation, outcome: Outcome) -> int | None:
        """1 + how many candidates the draft ranked above the realised token.

        From the candidates read with the glue pass when they decide it, else from the
        glue row (one host read on a device: :meth:`prefetch_ranks` does a round's at
        once)."""
        g = self.glue.get(sid)
        if g is None:
            return None
        k = outcome.accepted
        key = (sid, k, outcome.token)
        if key not in self._ranks:
            self._fill_ranks([(sid, spec, outcome)])
        return self._ranks[key]

    def prefetch_ranks(self, items: Iterable[tuple[int, Speculation, Outcome]]) -> None:
        """Work out the ranks :meth:`rank` will be asked for (those of proposed
        speculations), with at most one read."""
        self._fill_ranks([(sid, spec, o) for sid, spec, o in items if o.proposed])

    def _fill_ranks(self, items: Iterable[tuple[int, Speculation, Outcome]]) -> None:
        rows, tokens, excludes, keys = [], [], [], []
        for sid, spec, outcome in items:
            g = self.glue.get(sid)
            k = outcome.accepted
            key = (sid, k, outcome.token)
            if g is None or key in self._ranks:
                continue
            exclude = spec.tokens[k] if k < len(spec.tokens) else None
            c = self.cands.get(sid)
            r = (
                None
                if c is None
                else rank_from(c.vals[k], c.ids[k], outcome.token, exclude, c.complete)
            )
            if r is not None:
                self._ranks[key] = r + 1
            elif isinstance(g, np.ndarray):
                self._ranks[key] = count_above(g[k], outcome.token, exclude) + 1
            else:
                rows.append(g[k])
                tokens.append(outcome.token)
                excludes.append(exclude)
                keys.append(key)
        for key, n in zip(keys, count_above_many(rows, tokens, excludes)):
            self._ranks[key] = n + 1


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
        self._cands: dict[int, Candidates] = {}
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
            self._receive_glue(request, result)
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
            self._receive_step(request, result)
            self.step += 1
            more = any(b.steps > self.step for b in self.branches if b.handle is not None)
            self._goto(TreeEvent.STEPPED if more else TreeEvent.COMPLETE)

    def _receive_glue(self, request: Extend, logits: Any) -> None:
        """Rows g_0..g_K per sequence; on a device, the top entries of all of them in
        one ``topk`` and one read (candidates and ranks come from those)."""
        ctx = self.ctx
        flag = _validate(ctx, Lane.DRAFT, logits, request.rows, "glue pass", defer=True)
        xp = namespace(logits)
        offset = 0
        glue_rows: list[Any] = []
        for s, start, (_, _, feed) in zip(self.seqs, self._fed_from, request.items):
            d = self._draft[s.sid]
            rows = dict(d.rows)
            for j in range(len(feed)):
                rows[start + j] = logits[offset + j]
            self._draft[s.sid] = DraftHandle(handle=d.handle, held=d.held, rows=rows)
            offset += len(feed)
            first = len(s.tokens) - 1
            glue_rows.append([rows[p] for p in range(first, first + len(s.spec.tokens) + 1)])
        if isinstance(logits, np.ndarray):
            for s, g in zip(self.seqs, glue_rows):
                self._glue[s.sid] = xp.stack(g)
            return
        stacked = xp.stack([r for g in glue_rows for r in g])
        at = 0
        for s, g in zip(self.seqs, glue_rows):
            self._glue[s.sid] = stacked[at : at + len(g)]
            at += len(g)
        v = ctx.vocab_size
        widest = max((f for s in self.seqs for f in s.fanout), default=0)
        n = min(v, max(widest + 1, _RANK_FETCH) + _TIE_SLACK)
        vals, ids = top_candidates(stacked, n)
        vals_h, ids_h = _fetch_checked(ctx, Lane.DRAFT, "glue pass", [vals, ids], flag)
        ids_h = ids_h.astype(np.int64)
        at = 0
        for s, g in zip(self.seqs, glue_rows):
            sl = slice(at, at + len(g))
            self._cands[s.sid] = Candidates(vals=vals_h[sl], ids=ids_h[sl], complete=n >= v)
            at += len(g)

    def _receive_step(self, request: Extend, logits: Any) -> None:
        """One token per live branch; on a device, its draws and confidences in one read."""
        ctx = self.ctx
        uniforms = uniform_draws(ctx.source)
        flag = _validate(
            ctx, Lane.DRAFT, logits, request.rows, "tree decode", defer=uniforms is not None
        )
        # Only branches still wanted draw (a prune may have landed meanwhile).
        wanted = self._wanted
        keep = [
            i
            for i, b in enumerate(self._sent)
            if wanted is None or wanted.get(b.sid) == (b.k, b.token)
        ]
        if not keep:
            _fetch_checked(ctx, Lane.DRAFT, "tree decode", [], flag)
            return
        xp = namespace(logits)
        live = [self._sent[i] for i in keep]
        rows = _rows(xp, logits, keep)
        by_sid = {s.sid: s for s in self.seqs}
        temps = [by_sid[b.sid].params.effective_draft_temperature for b in live]
        fans = [_at(by_sid[b.sid].saguaro_fan, self.step) for b in live]
        keys: list[Key] = [
            ("tree", by_sid[b.sid].stream, by_sid[b.sid].round + 1, b.k, b.token, self.step)
            for b in live
        ]
        conf: list[float] | None = None
        if uniforms is None:
            drawn, q = _draft_tokens(ctx, rows, temps, fans, keys)
        else:
            draws = _Draws(ctx, rows, temps, fans, keys, uniforms)
            parts = list(draws.parts)
            on_device = not isinstance(rows, np.ndarray)
            if on_device:  # read with the tokens, so a cache hit needs no read of its own
                parts.append(confidence_rows(rows))
            host = _fetch_checked(ctx, Lane.DRAFT, "tree decode", parts, flag)
            if on_device:
                conf = [float(c) for c in host.pop()]
            drawn, q = draws.tokens(host), draws.q
        for i, b in enumerate(live):
            b.tokens.append(drawn[i])
            b.q.append(q[i])
            b.raw.append(rows[i])
            if conf is not None and len(b.conf) == len(b.tokens) - 1:
                b.conf.append(conf[i])

    def _plan_branches(self) -> None:
        wanted = self._wanted
        for s in self.seqs:
            g = self._glue[s.sid]
            c = self._cands.get(s.sid)
            spec = s.spec.tokens
            for k in range(len(spec) + 1):
                if s.fanout[k] <= 0 or s.steps[k] <= 0:
                    continue
                exclude = spec[k] if k < len(spec) else None
                picked = (
                    None
                    if c is None
                    else pick_top(c.vals[k], c.ids[k], s.fanout[k], exclude, c.complete)
                )
                if picked is None:  # host rows, or a tie wider than the read (rare)
                    picked = top_ids(g[k], s.fanout[k], exclude=exclude)
                for t in picked:
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
        return TreeResult(
            glue=self._glue, draft=self._draft, branches=tuple(self.branches), cands=self._cands
        )


#: Glue candidates read per row at least, so that the rank of the realised token (which
#: the fan-out estimates use up to 32) usually comes from the host.
_RANK_FETCH = 33
_TIE_SLACK = 8


def _at(values: tuple[int, ...], i: int) -> int:
    return values[i] if i < len(values) else 0
