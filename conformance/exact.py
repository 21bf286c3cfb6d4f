"""Exact enumeration of the whole Saguaro machine, and the target it must reproduce.

How it works
============

The machine asks its random source for every random decision (accept tests, recovery
and bonus tokens, draft samples, tree samples). :class:`_ScriptSource` answers from a
*script* of prescribed outcomes; when the script runs out it raises :class:`_Branch`
listing every outcome of the pending draw with its exact probability. The enumerator
snapshots the machine (``copy.deepcopy``) together with the model-side state (the
token list behind every handle: :class:`PureModel` keeps nothing else) before each
request that can draw, and re-delivers the result once per outcome. So every
reachable path of the *unmodified* machine is explored, with its exact probability.

Path-by-path enumeration would explode (each tree branch's draft samples multiply the
paths). Instead the enumerator runs a dynamic program over *machine states*: it
advances every state to the end of its next verification round and merges states with
the same canonical key (committed tokens, the speculation each sequence will be
verified with -- tokens, proposal rows and source -- the tokens every handle really
holds, and, when the configuration is adaptive, the estimators that drive it). The
remaining work is driven *target first* by default: the verification completes before
the SSD tree, so the machine prunes the tree to the one branch that can be used and
the other branches' draws (which cannot affect the output) are never made. The
``order="draft_first"`` setting keeps the whole tree (every branch sampled) and is
used on very small cases to catch cache-misuse bugs that pruning would hide.

The exact target distribution is computed independently of ``ssd_core``: a plain
numpy re-implementation of temperature, top-k, top-p and min-p (:func:`processed_probs`)
applied autoregressively with the same stop rules (:func:`target_distribution`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np

from ssd_core import (
    HandleError,
    InputError,
    Lane,
    Machine,
    RandomStream,
    SamplingParams,
    SSDConfig,
    Stage,
)
from ssd_core.testing import Extend, Request, perform, to_numpy

__all__ = [
    "EnumerationTooLarge",
    "ExactComparison",
    "ExactDistribution",
    "LogitsFn",
    "PureModel",
    "compare_exact",
    "enumerate_machine",
    "logits_fn_of",
    "processed_probs",
    "restrict_vocab",
    "target_distribution",
    "total_variation",
]

#: ``context -> raw logits`` (a 1-D float array of the vocabulary size).
LogitsFn = Callable[[tuple[int, ...]], np.ndarray]

#: Generated tokens per prompt, in prompt order.
Outputs = tuple[tuple[int, ...], ...]


class EnumerationTooLarge(RuntimeError):
    """The enumeration would exceed its state budget; shrink the case."""


# -- a model whose whole state is the token list of each handle ----------------------


class PureModel:
    """A Model-protocol implementation over a pure ``context -> logits`` function.

    Its only state is :attr:`table` (handle -> token tuple), which the enumerator swaps
    per machine state; logits rows are memoised by context.

    Args:
        fn: the logits function (called with the whole context).
        vocab_size: number of logits per row.
        name: for messages.
    """

    tokenizer = None
    context_size = None

    def __init__(self, fn: LogitsFn, *, vocab_size: int, name: str = "pure") -> None:
        self.fn = fn
        self.vocab_size = vocab_size
        self.name = name
        self.table: dict[int, tuple[int, ...]] = {}
        self.next_handle = 0
        self._memo: dict[tuple[int, ...], np.ndarray] = {}

    def row(self, context: tuple[int, ...]) -> np.ndarray:
        """The memoised logits row after ``context``."""
        r = self._memo.get(context)
        if r is None:
            r = np.asarray(self.fn(context), dtype=np.float64).reshape(self.vocab_size)
            self._memo[context] = r
        return r

    def _get(self, h: Any) -> tuple[int, ...]:
        try:
            return self.table[h]
        except KeyError:
            raise HandleError(f"{self.name}: unknown or closed handle {h!r}") from None

    def open(self, tokens: Sequence[int]) -> int:
        h = self.next_handle
        self.next_handle += 1
        self.table[h] = tuple(int(t) for t in tokens)
        return h

    def extend(self, requests: Sequence[tuple[Any, Sequence[int]]]) -> np.ndarray:
        rows = []
        for h, toks in requests:
            ctx = self._get(h)
            for t in toks:
                if not 0 <= int(t) < self.vocab_size:
                    raise InputError(f"{self.name}: token {t} outside the vocabulary")
                ctx = ctx + (int(t),)
                rows.append(self.row(ctx))
            self.table[h] = ctx
        return np.array(rows, dtype=np.float64).reshape(len(rows), self.vocab_size)

    def fork(self, handle: Any, length: int) -> int:
        toks = self._get(handle)
        if not 0 <= length <= len(toks):
            raise HandleError(f"{self.name}: fork length {length} outside [0, {len(toks)}]")
        return self.open(toks[:length])

    def truncate(self, handle: Any, length: int) -> None:
        toks = self._get(handle)
        if not 0 <= length <= len(toks):
            raise HandleError(f"{self.name}: truncate length {length} outside [0, {len(toks)}]")
        self.table[handle] = toks[:length]

    def close(self, handle: Any) -> None:
        self._get(handle)
        del self.table[handle]


def logits_fn_of(make_model: Callable[[], Any]) -> LogitsFn:
    """A memoised ``context -> logits`` function backed by any Model-protocol backend.

    Each new context is scored by opening a handle on all but its last token, extending
    by the last token and closing the handle, so the backend's state never matters.

    Args:
        make_model: a factory returning a fresh model (called once).

    Returns:
        The logits function (host numpy float64 rows).
    """
    model = make_model()
    memo: dict[tuple[int, ...], np.ndarray] = {}

    def fn(context: tuple[int, ...]) -> np.ndarray:
        ctx = tuple(int(t) for t in context)
        if ctx not in memo:
            if not ctx:
                raise InputError("logits_fn_of needs a non-empty context")
            h = model.open(list(ctx[:-1]))
            try:
                row = to_numpy(model.extend([(h, [ctx[-1]])]))[0]
            finally:
                model.close(h)
            memo[ctx] = np.array(row, dtype=np.float64)
        return memo[ctx]

    return fn


def restrict_vocab(fn: LogitsFn, ids: Sequence[int]) -> LogitsFn:
    """A small-vocabulary model made from a large one: token ``i`` stands for ``ids[i]``.

    The restricted model's logits are the large model's logits at ``ids`` (so its
    distribution is the large one's conditioned on staying inside ``ids``). Exact
    enumeration over a real backend runs on such a model.

    Args:
        fn: the large model's logits function.
        ids: distinct real token ids, one per small token.

    Returns:
        The logits function of the small model (vocabulary ``len(ids)``).
    """
    index = np.asarray(list(ids), dtype=np.int64)

    def small(context: tuple[int, ...]) -> np.ndarray:
        real = tuple(int(index[t]) for t in context)
        return np.asarray(fn(real), dtype=np.float64)[index]

    return small


# -- the target's exact distribution, independently of ssd_core ----------------------


def processed_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The processed next-token distribution: a straightforward re-implementation.

    Temperature 0 is one-hot at the lowest id among the maximal logits. Otherwise:
    divide by the temperature; top-k keeps every token whose logit is >= the k-th
    largest; softmax; top-p keeps token t iff the mass of tokens strictly more probable
    than t is < top_p; min-p keeps t iff p_t >= min_p * max p; renormalise after each.

    Args:
        logits: one raw logits row.
        params: the sampling parameters.

    Returns:
        A float64 probability vector.
    """
    z = np.asarray(logits, dtype=np.float64)
    v = z.shape[0]
    if params.temperature == 0:
        out = np.zeros(v)
        out[int(np.flatnonzero(z == z.max())[0])] = 1.0
        return out
    z = z / params.temperature
    if 0 < params.top_k < v:
        kth = sorted(z.tolist(), reverse=True)[params.top_k - 1]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p = p / p.sum()
    if params.top_p < 1.0:
        keep = np.array([p[p > p[t]].sum() < params.top_p for t in range(v)])
        p = np.where(keep, p, 0.0)
        p = p / p.sum()
    if params.min_p > 0.0:
        p = np.where(p >= params.min_p * p.max(), p, 0.0)
        p = p / p.sum()
    return np.asarray(p, dtype=np.float64)


def _stops(tokens: tuple[int, ...], gen: int, params: SamplingParams) -> bool:
    if params.stop_token_ids and tokens[-1] in params.stop_token_ids:
        return True
    return any(gen >= len(s) and tokens[-len(s) :] == s for s in params.stop_sequences)


def target_distribution(
    fn: LogitsFn, prompt: Sequence[int], params: SamplingParams, max_new: int
) -> dict[tuple[int, ...], float]:
    """The exact distribution of autoregressive generation from the processed target.

    Args:
        fn: the target's logits function.
        prompt: the prompt tokens.
        params: sampling parameters (processing and stop rules; tokenizer EOS is not
            consulted: pass stop ids explicitly).
        max_new: the generation budget.

    Returns:
        generated tokens -> probability, over every sequence that ends by a stop token,
        a stop sequence or the budget.
    """
    out: dict[tuple[int, ...], float] = {}
    prompt = tuple(int(t) for t in prompt)

    def walk(ctx: tuple[int, ...], gen: tuple[int, ...], prob: float) -> None:
        if len(gen) >= max_new:
            out[gen] = out.get(gen, 0.0) + prob
            return
        p = processed_probs(fn(ctx), params)
        for t in map(int, np.flatnonzero(p > 0)):
            ctx2, gen2 = ctx + (t,), gen + (t,)
            if _stops(ctx2, len(gen2), params):
                out[gen2] = out.get(gen2, 0.0) + prob * float(p[t])
            else:
                walk(ctx2, gen2, prob * float(p[t]))

    if max_new <= 0:
        return {(): 1.0}
    walk(prompt, (), 1.0)
    return out


def joint_target_distribution(
    fn: LogitsFn,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    max_new: int,
) -> dict[Outputs, float]:
    """The product of each prompt's :func:`target_distribution` (sequences are independent)."""
    per = [target_distribution(fn, pr, pa, max_new) for pr, pa in zip(prompts, params, strict=True)]
    out: dict[Outputs, float] = {}
    for combo in itertools.product(*(d.items() for d in per)):
        out[tuple(c[0] for c in combo)] = math.prod(c[1] for c in combo)
    return out


def total_variation(a: Mapping[Any, float], b: Mapping[Any, float]) -> float:
    """Half the L1 distance between two distributions given as dicts."""
    return 0.5 * sum(abs(a.get(x, 0.0) - b.get(x, 0.0)) for x in set(a) | set(b))


# -- the enumerating source ----------------------------------------------------------


class _Branch(Exception):
    """Raised by the script source when it meets a draw with no prescribed outcome."""

    def __init__(self, options: list[tuple[list[Any], float]]) -> None:
        super().__init__("branch")
        self.options = options


class _ScriptSource:
    """Answers draws from a script; the first unscripted draw raises :class:`_Branch`."""

    def __init__(self, script: Sequence[list[Any]]) -> None:
        self.script = list(script)
        self.pos = 0

    def _next(self, options: Callable[[], list[tuple[list[Any], float]]]) -> list[Any]:
        if self.pos < len(self.script):
            self.pos += 1
            return self.script[self.pos - 1]
        raise _Branch(options())

    def bernoulli(self, keys: Sequence[Any], probs: Sequence[float]) -> list[bool]:
        def options() -> list[tuple[list[Any], float]]:
            per = []
            for p in probs:
                p = float(p)
                per.append([(o, w) for o, w in ((True, p), (False, 1.0 - p)) if w > 0.0])
            return _product(per)

        return list(self._next(options)) if keys else []

    def categorical(self, keys: Sequence[Any], weights: Any) -> list[int]:
        if not keys:
            return []

        def options() -> list[tuple[list[Any], float]]:
            rows = to_numpy(weights).astype(np.float64)
            rows = rows / rows.sum(axis=1, keepdims=True)
            per = [[(int(t), float(r[t])) for t in np.flatnonzero(r > 0)] for r in rows]
            return _product(per)

        return list(self._next(options))


def _product(per: list[list[tuple[Any, float]]]) -> list[tuple[list[Any], float]]:
    out = []
    for combo in itertools.product(*per):
        out.append(([c[0] for c in combo], math.prod(c[1] for c in combo)))
    return out


# -- the dynamic program -------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ExactDistribution:
    """The exact output distribution of a machine run, and what the run did.

    Attributes:
        outputs: generated tokens per prompt -> probability.
        hit_probability_mass: expected number of cache hits per run (> 0 iff a hit is
            reachable with nonzero probability).
        miss_probability_mass: expected number of cache misses per run.
        fallbacks: fallback kind -> expected number of sequence fallbacks per run.
        states: how many merged round-boundary states were expanded.
        leaked_handles: largest number of handles left open at the end of any path.
        order: ``"target_first"`` (tree pruned to the used branch) or ``"draft_first"``.
        speculation_max_dev: lemma (ii) check -- over every round boundary, sequence,
            committed context and speculation source (cache hit, fast), the largest
            |P(served tokens = d | context, source) - prod_i q_i(d_i)| where q are the
            rows the speculation carries. 0 (to rounding) means every served
            speculation is distributed exactly as a fresh sample from its q.
    """

    outputs: dict[Outputs, float]
    hit_probability_mass: float
    miss_probability_mass: float
    fallbacks: dict[str, float]
    states: int
    leaked_handles: int
    order: str
    speculation_max_dev: float = 0.0


@attrs.frozen(kw_only=True)
class ExactComparison:
    """Machine vs target, exactly.

    Attributes:
        max_abs_diff: the largest |P_machine(x) - P_target(x)| over all outputs x.
        tv: the total-variation distance.
        machine: the machine's :class:`ExactDistribution`.
        target: the target's exact distribution.
    """

    max_abs_diff: float
    tv: float
    machine: ExactDistribution
    target: dict[Outputs, float]


def _may_draw(req: Request) -> bool:
    return isinstance(req, Extend) and req.purpose.draws


class _State:
    __slots__ = ("machine", "tables", "nexts")

    def __init__(
        self,
        machine: Machine,
        tables: dict[Lane, dict[int, tuple[int, ...]]],
        nexts: dict[Lane, int],
    ) -> None:
        self.machine = machine
        self.tables = tables
        self.nexts = nexts

    def clone(self, source: Any = None) -> _State:
        return _State(
            self.machine.clone(source),
            {lane: dict(t) for lane, t in self.tables.items()},
            dict(self.nexts),
        )


def _perform(models: dict[Lane, PureModel], state: _State, req: Request) -> Any:
    model = models[req.lane]
    model.table = state.tables[req.lane]
    model.next_handle = state.nexts[req.lane]
    try:
        return perform(model, req)
    finally:
        state.nexts[req.lane] = model.next_handle


def _check_mirrors(state: _State) -> None:
    """The machine's record of what each handle holds must match the backend's."""
    for (sid, lane), (h, held) in state.machine.held().items():
        if lane not in state.tables:
            continue
        real = state.tables[lane].get(h)  # type: ignore[call-overload]
        if real is None or tuple(held) != real:
            raise AssertionError(
                f"sequence {sid}: the machine believes its {lane.value} handle holds "
                f"{tuple(held)}, the backend holds {real}"
            )


def _finished(m: Machine) -> bool:
    return all(v.stage in (Stage.FINISHED, Stage.CLOSED) for v in m.sequences())


def enumerate_machine(
    target: LogitsFn,
    draft: LogitsFn | None,
    *,
    vocab_size: int,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams] | SamplingParams,
    mode: str,
    config: SSDConfig | None = None,
    max_new_tokens: int,
    order: str = "target_first",
    max_states: int = 200_000,
    wrap_source: Callable[[Any], Any] | None = None,
) -> ExactDistribution:
    """The exact output distribution of the full, unmodified machine.

    Every random draw is enumerated with its exact probability; states are merged at
    every verification-round boundary (see the module docstring).

    Args:
        target: the target's logits function.
        draft: the draft's logits function (``None`` for ``mode="ar"``).
        vocab_size: the shared vocabulary size (keep it tiny: 2-6).
        prompts: one or more non-empty prompts.
        params: one SamplingParams for all prompts, or one per prompt.
        mode: ``"ar"``, ``"sd"`` or ``"ssd"``.
        config: the SSD configuration (default ``SSDConfig()``).
        max_new_tokens: the generation budget.
        order: ``"target_first"`` (the verification completes before the tree, which
            is then pruned to the branch that is used) or ``"draft_first"`` (the whole
            tree is decoded and sampled before the verification, as the sequential
            driver does).
        max_states: budget of expanded states; beyond it :class:`EnumerationTooLarge`.
        wrap_source: optional wrapper around the enumerating source (tests use it to
            inject deliberately lossy samplers; it must pass unknown draws through).

    Returns:
        The :class:`ExactDistribution`.

    Raises:
        EnumerationTooLarge: the case is too big to enumerate.
        ValueError: an unknown ``order``.
    """
    if order not in ("target_first", "draft_first"):
        raise ValueError(f"order must be 'target_first' or 'draft_first', got {order!r}")
    config = config or SSDConfig()
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    models = {Lane.TARGET: PureModel(target, vocab_size=vocab_size, name="target")}
    if mode != "ar":
        if draft is None:
            raise ValueError(f"mode {mode!r} needs a draft")
        models[Lane.DRAFT] = PureModel(draft, vocab_size=vocab_size, name="draft")
    machine = Machine(mode=mode, config=config, vocab_size=vocab_size, source=_ScriptSource([]))
    for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
        machine.add(
            list(prompt),
            sp,
            max_new_tokens=max_new_tokens,
            stream=RandomStream(None, i),
            stop_ids=frozenset(sp.stop_token_ids or ()),
        )
    lanes = (Lane.TARGET, Lane.DRAFT) if order == "target_first" else (Lane.DRAFT, Lane.TARGET)
    frontier: dict[Hashable, tuple[_State, float]] = {
        "start": (_State(machine, {lane: {} for lane in models}, {lane: 0 for lane in models}), 1.0)
    }
    outputs: dict[Outputs, float] = {}
    hits = misses = 0.0
    fallbacks: dict[str, float] = {}
    expanded = 0
    leaked = 0
    spec_dev = 0.0

    while frontier:
        nxt: dict[Hashable, tuple[_State, float]] = {}
        for state, prob in frontier.values():
            expanded += 1
            if expanded > max_states:
                raise EnumerationTooLarge(f"more than {max_states} states; use a smaller case")
            base = state.machine.counters
            h0, l0, f0 = base.cache_hits, base.cache_lookups, dict(base.fallbacks)
            r0 = state.machine.rounds
            for child, p in _advance(state, prob, models, lanes, r0, wrap_source):
                cm = child.machine.counters
                hits += p * (cm.cache_hits - h0)
                misses += p * ((cm.cache_lookups - l0) - (cm.cache_hits - h0))
                for kind, n in cm.fallbacks.items():
                    if n - f0.get(kind, 0):
                        fallbacks[kind] = fallbacks.get(kind, 0.0) + p * (n - f0.get(kind, 0))
                if child.machine.idle:
                    out = tuple(tuple(v.generated) for v in child.machine.sequences())
                    outputs[out] = outputs.get(out, 0.0) + p
                    leaked = max(leaked, sum(len(t) for t in child.tables.values()))
                    continue
                _check_mirrors(child)
                key = child.machine.snapshot()
                if key in nxt:
                    nxt[key] = (nxt[key][0], nxt[key][1] + p)
                else:
                    nxt[key] = (child, p)
        spec_dev = max(spec_dev, _speculation_deviation(nxt.values()))
        frontier = nxt
    return ExactDistribution(
        outputs=outputs,
        hit_probability_mass=hits,
        miss_probability_mass=misses,
        fallbacks=fallbacks,
        states=expanded,
        leaked_handles=leaked,
        order=order,
        speculation_max_dev=spec_dev,
    )


def _speculation_deviation(states: Any) -> float:
    """Lemma (ii): served speculations are fresh samples from the q they carry."""
    groups: dict[Hashable, dict[tuple[int, ...], list[Any]]] = {}
    for st, p in states:
        for v in st.machine.sequences():
            spec = v.speculation
            if spec is None or not spec.tokens or v.stage not in (Stage.READY, Stage.VERIFYING):
                continue
            g = groups.setdefault((v.sid, v.tokens, spec.source), {})
            entry = g.setdefault(spec.tokens, [0.0, spec.q])
            entry[0] += p
    dev = 0.0
    for g in groups.values():
        mass = sum(e[0] for e in g.values())
        for toks, (p, q) in g.items():
            if q is None:  # fast backup tokens: point masses, q is one-hot on each token
                want = 1.0
            else:
                rows = to_numpy(q).astype(np.float64)
                rows = rows / rows.sum(axis=1, keepdims=True)
                want = math.prod(float(rows[i, t]) for i, t in enumerate(toks))
            dev = max(dev, abs(p / mass - want))
    return dev


def _advance(
    state: _State,
    prob: float,
    models: dict[Lane, PureModel],
    lanes: tuple[Lane, Lane],
    rounds0: int,
    wrap: Callable[[Any], Any] | None,
) -> list[tuple[_State, float]]:
    """Every (state, probability) reachable from ``state`` at the end of its next round
    (or at the end of the run), by exhaustive branching on the draws."""
    done: list[tuple[_State, float]] = []
    stack = [(state, prob)]
    while stack:
        st, p = stack.pop()
        m = st.machine
        if m.idle or (m.rounds > rounds0 and not _finished(m)):
            done.append((st, p))
            continue
        req = None
        for lane in lanes:
            req = m.next_request(lane)
            if req is not None:
                break
        if req is None:
            raise RuntimeError(f"the machine is stuck in {m.state} with nothing to do")
        if not _may_draw(req):
            result = _perform(models, st, req)
            m.deliver(req, result)
            stack.append((st, p))
            continue
        stack.extend(_deliver_all(st, p, req, models, [], wrap))
    return done


def _deliver_all(
    st: _State,
    p: float,
    req: Request,
    models: dict[Lane, PureModel],
    script: list[list[Any]],
    wrap: Callable[[Any], Any] | None,
) -> list[tuple[_State, float]]:
    """Deliver ``req`` (outstanding on ``st``) once per outcome of its draws."""
    src: Any = _ScriptSource(script)
    child = st.clone(wrap(src) if wrap is not None else src)
    creq = child.machine.outstanding(req.lane)
    assert creq is not None
    result = _perform(models, child, creq)
    try:
        child.machine.deliver(creq, result)
    except _Branch as b:
        out = []
        for outcome, q in b.options:
            out.extend(_deliver_all(st, p * q, req, models, script + [outcome], wrap))
        return out
    return [(child, p)]


def compare_exact(
    target: LogitsFn,
    draft: LogitsFn | None,
    *,
    vocab_size: int,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams] | SamplingParams,
    mode: str,
    config: SSDConfig | None = None,
    max_new_tokens: int,
    order: str = "target_first",
    max_states: int = 200_000,
    wrap_source: Callable[[Any], Any] | None = None,
) -> ExactComparison:
    """Enumerate the machine and compare it with the target's exact distribution.

    Arguments as for :func:`enumerate_machine`.

    Returns:
        An :class:`ExactComparison` (``max_abs_diff <= 1e-9`` means exact).
    """
    plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    dist = enumerate_machine(
        target,
        draft,
        vocab_size=vocab_size,
        prompts=prompts,
        params=plist,
        mode=mode,
        config=config,
        max_new_tokens=max_new_tokens,
        order=order,
        max_states=max_states,
        wrap_source=wrap_source,
    )
    want = joint_target_distribution(target, prompts, plist, max_new_tokens)
    keys = set(want) | set(dist.outputs)
    diff = max((abs(want.get(k, 0.0) - dist.outputs.get(k, 0.0)) for k in keys), default=0.0)
    return ExactComparison(
        max_abs_diff=diff, tv=total_variation(dist.outputs, want), machine=dist, target=want
    )
