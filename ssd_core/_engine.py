"""The Engine: one owner of two models and a running machine; requests join and leave.

An :class:`Engine` keeps a target (and a draft) loaded and a machine running on its
own thread. :meth:`Engine.submit` adds a request at any time -- also while others are
mid-round -- and returns a :class:`RequestHandle` to stream, wait on, or cancel from
any thread; an ``async for`` over the handle serves asyncio code (a server) without a
thread per request. :func:`~ssd_core.generate` and :func:`~ssd_core.stream` are thin
wrappers over a private engine.

Error contract (as h11 documents ``next_event``): every call validates its input and
raises :class:`~ssd_core.ConfigError`, :class:`~ssd_core.InputError` or
:class:`~ssd_core.UnknownOptionError` *before any work*; the engine is unchanged. A
failure while requests run (a backend raised, returned bad logits, or the target ran
past its timeout) fails every request in flight with a
:class:`~ssd_core.GenerationError` whose ``partial`` keeps every token committed
before the fault, and shuts the engine down: every handle is closed -- each exactly
once, from the backends' ledgers -- and every thread joined; a call still stuck in a
backend is never closed under (its worker closes that model's handles when it
returns, then ends); later submissions raise :class:`~ssd_core.EngineClosedError`.
A draft-lane failure, with ``on_draft_error="degrade"`` (the default), fails nothing:
the engine continues with plain target steps, exactly, and counts it in
``Metrics.draft_faults``. A cancelled request ends with finish reason ``"cancelled"``
and keeps what it had committed. Ctrl-C in a caller waiting on the engine cancels the
run and is re-raised after at most ``INTERRUPT_WAIT_S`` seconds of waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import attrs

from ._config import MODES, SamplingParams, SSDConfig, check_int, check_seed, stop_ids_for
from ._drivers import DRIVERS, Backend, SimulatedClock, WorkerExecutor, run_job
from ._errors import (
    ConfigError,
    EngineClosedError,
    GenerationError,
    InputError,
    InternalError,
    LaneTimeoutError,
    UnknownOptionError,
)
from ._jobs import Job
from ._machine import Finished, Machine, MachineState, TokensCommitted
from ._metrics import Metrics, RequestMetrics
from ._policy import CostModel
from ._protocol import Model
from ._random import RandomSource, SeededSource, Stream
from ._requests import Fork, Lane, Open
from ._sequence import Stage
from ._text import TextTracker

__all__ = [
    "DRAFT_ERRORS",
    "Engine",
    "RequestHandle",
    "RequestResult",
    "StreamEvent",
    "check_prompts",
    "check_sampling",
]

log = logging.getLogger("ssd_core")

DRAFT_ERRORS = ("degrade", "raise")

#: How often a blocked waiter wakes to let Ctrl-C through (seconds).
_POLL_S = 0.1

#: How long a caller interrupted by Ctrl-C waits for the engine to stop before the
#: KeyboardInterrupt goes on (seconds); the engine thread finishes the cleanup later,
#: when a backend call still running has returned.
INTERRUPT_WAIT_S = 0.5


@attrs.frozen(kw_only=True)
class StreamEvent:
    """Tokens one request committed in one round. ``index`` is the request's position
    in its batch (0 for a single :meth:`Engine.submit`); ``text`` the new stable text,
    when the target has a tokenizer."""

    index: int
    tokens: tuple[int, ...]
    text: str | None = None


@attrs.frozen(kw_only=True)
class RequestResult:
    """How one request ended.

    Attributes:
        tokens: the generated tokens.
        text: their text (cut before a matched stop string), or ``None`` for id-only
            models.
        finish_reason: ``"stop"`` (a stop id, stop sequence or stop string),
            ``"length"`` (its budget or the context) or ``"cancelled"``.
        stop: the stop string that matched, if one did.
        prompt_tokens: the prompt's length.
        metrics: what the engine did for this request.
        first_token_s / total_s: seconds from submission to its first token and to its
            end (``None`` before it had any).
    """

    tokens: tuple[int, ...]
    text: str | None
    finish_reason: str | None
    stop: str | None
    prompt_tokens: int
    metrics: RequestMetrics | None
    first_token_s: float | None
    total_s: float | None


class RequestHandle:
    """One request in an :class:`Engine`: iterate it (or ``async for`` it) for its
    :class:`StreamEvent` values, :meth:`result` to wait for the end, :meth:`cancel`
    from any thread."""

    def __init__(
        self, engine: Engine, rid: int, index: int, prompt_len: int, text: TextTracker | None
    ) -> None:
        self._engine = engine
        self.id = rid
        self.index = index
        self.prompt_len = prompt_len
        self._text = text
        self._cond = threading.Condition()
        self._events: list[StreamEvent] = []
        self._tokens: list[int] = []
        self._result: RequestResult | None = None
        self._error: BaseException | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._submitted = time.perf_counter()
        self._first: float | None = None
        self._tap: Callable[[StreamEvent | None], None] | None = None

    # -- the consumer's side ----------------------------------------------------------

    @property
    def done(self) -> bool:
        with self._cond:
            return self._result is not None or self._error is not None

    @property
    def tokens(self) -> tuple[int, ...]:
        """The tokens committed so far."""
        with self._cond:
            return tuple(self._tokens)

    def cancel(self) -> None:
        """Stop this request; its handles are closed within one round. Safe from any
        thread, and after it ended."""
        self._engine._post(("cancel", self.id))

    def __iter__(self) -> Iterator[StreamEvent]:
        """Events as rounds commit them (blocking); ends when the request does, raising
        :class:`~ssd_core.GenerationError` if the engine failed."""
        i = 0
        while True:
            with self._cond:
                while i >= len(self._events) and self._result is None and self._error is None:
                    self._cond.wait(_POLL_S)
                if i < len(self._events):
                    ev = self._events[i]
                    i += 1
                else:
                    if self._error is not None:
                        raise self._error
                    return
            yield ev

    def result(self, timeout: float | None = None) -> RequestResult:
        """Wait for the end and return it.

        Raises:
            GenerationError: the engine failed; ``partial`` holds what was committed.
            TimeoutError: ``timeout`` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._result is None and self._error is None:
                left = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
                if left <= 0:
                    raise TimeoutError(f"request {self.id} did not finish in {timeout} s")
                self._cond.wait(left)
            if self._error is not None:
                raise self._error
            assert self._result is not None
            return self._result

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[StreamEvent]:
        i = 0
        while True:
            fut: asyncio.Future[None] | None = None
            with self._cond:
                if i < len(self._events):
                    ev: StreamEvent | None = self._events[i]
                    i += 1
                elif self._error is not None:
                    raise self._error
                elif self._result is not None:
                    return
                else:
                    ev = None
                    loop = asyncio.get_running_loop()
                    fut = loop.create_future()
                    self._waiters.append((loop, fut))
            if ev is not None:
                yield ev
            elif fut is not None:
                await fut

    async def wait(self) -> RequestResult:
        """The asyncio way to :meth:`result`."""
        async for _ in self:
            pass
        return self.result(timeout=0.0 if self.done else None)

    # -- the engine's side ------------------------------------------------------------

    def _notify(self) -> None:
        self._cond.notify_all()
        waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):  # the consumer's loop has closed
                loop.call_soon_threadsafe(_set_done, fut)

    def _push(self, tokens: tuple[int, ...], text: str | None) -> None:
        ev = StreamEvent(index=self.index, tokens=tokens, text=text)
        with self._cond:
            if self._first is None:
                self._first = time.perf_counter()
            self._tokens.extend(tokens)
            self._events.append(ev)
            self._notify()
        if self._tap is not None:
            self._tap(ev)

    def _partial(
        self, reason: str | None, metrics: RequestMetrics | None, stop: str | None = None
    ) -> RequestResult:
        now = time.perf_counter()
        text = None
        if self._text is not None:
            text = self._text.text
        return RequestResult(
            tokens=tuple(self._tokens),
            text=text,
            finish_reason=reason,
            stop=stop,
            prompt_tokens=self.prompt_len,
            metrics=metrics,
            first_token_s=None if self._first is None else self._first - self._submitted,
            total_s=now - self._submitted if reason is not None else None,
        )

    def _finish(self, result: RequestResult) -> None:
        with self._cond:
            self._result = result
            self._notify()
        if self._tap is not None:
            self._tap(None)

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            if self._result is not None or self._error is not None:
                return
            self._error = error
            self._notify()
        if self._tap is not None:
            self._tap(None)


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# -- validation shared with generate() ---------------------------------------------------


def check_prompts(
    prompts: Any, vocab: int, context: int | None, draft_context: int | None = None
) -> list[list[int]]:
    """Token-id prompts, each non-empty, in the vocabulary and leaving room in the
    target's context to generate (a handle holds all but the last prompt token).

    Raises:
        InputError: naming the prompt and the value.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise InputError("prompts must be a non-empty list of token-id lists")
    checked: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise InputError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise InputError(f"prompt {i} is empty; every prompt needs at least one token")
        ids = []
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int) and not hasattr(t, "__index__"):
                raise InputError(f"prompt {i} holds {t!r}, which is not a token id")
            t = int(t)
            if not 0 <= t < vocab:
                raise InputError(
                    f"prompt {i} holds token id {t}, outside the vocabulary [0, {vocab})"
                )
            ids.append(t)
        if context is not None and len(ids) > context:
            raise InputError(
                f"prompt {i} has {len(ids)} tokens but the target's context holds {context}: "
                "it leaves no room to generate (shorten it or raise the context size)"
            )
        checked.append(ids)
    return checked


def check_sampling(sampling: Any, n: int, vocab: int, tokenizer: Any) -> list[SamplingParams]:
    """One :class:`SamplingParams` per prompt, with stop ids inside the vocabulary and
    stop strings only where there is a tokenizer."""
    if sampling is None:
        sampling = SamplingParams()
    if isinstance(sampling, SamplingParams):
        params = [sampling] * n
    else:
        if isinstance(sampling, (str, bytes)) or not isinstance(sampling, Sequence):
            raise ConfigError(
                f"sampling must be a SamplingParams or a list of them, got {sampling!r}"
            )
        params = list(sampling)
        if len(params) != n or not all(isinstance(p, SamplingParams) for p in params):
            raise ConfigError(
                f"sampling must be one SamplingParams or one per prompt ({n} prompts, got "
                f"{len(params)} values)"
            )
    for p in params:
        for stop in (p.stop_token_ids or (), *p.stop_sequences):
            for t in stop:
                if not 0 <= t < vocab:
                    raise ConfigError(f"stop token id {t} is outside the vocabulary [0, {vocab})")
        if p.stop and tokenizer is None:
            raise ConfigError("stop strings need a target with a tokenizer; use stop_token_ids")
    return params


def _vocab_size(model: Any, role: str) -> int:
    v = getattr(model, "vocab_size", None)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"the {role} model has no valid vocab_size (got {v!r})")
    return v


def _context(model: Any, role: str) -> int | None:
    c = getattr(model, "context_size", None)
    if c is not None and (not isinstance(c, int) or isinstance(c, bool) or c < 1):
        raise ConfigError(f"the {role} model's context_size must be an int >= 1 or None, got {c!r}")
    return c


#: A model whose declared cost per call is below this (seconds) runs on the engine's
#: thread under the threaded driver.
_INLINE_S = 5e-4


def _cheap(model: Any) -> bool:
    latency = getattr(model, "latency", None)
    return latency is not None and latency.per_call + latency.per_token < _INLINE_S


def _timeout(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name} must be a number of seconds > 0 or None, got {value!r}")
    return float(value)


# -- the engine --------------------------------------------------------------------------


class Engine:
    """A target (and a draft), a running Saguaro machine, and requests that come and go.

    Args:
        target: the model whose distribution every request follows exactly.
        draft: the speculator (not needed in ``"ar"`` mode). May be the same object as
            ``target``: calls to one model never overlap.
        mode: ``"ar"``, ``"sd"`` or ``"ssd"``.
        config: the :class:`SSDConfig`.
        driver: ``"threaded"`` (default: each model on its own worker thread),
            ``"sequential"`` or ``"simulated"``.
        source: the random source (default: seeded per request, see :meth:`submit`).
        on_draft_error: ``"degrade"`` (a failing draft is dropped and generation goes
            on target-only) or ``"raise"``.
        draft_timeout / target_timeout: seconds one backend call on that lane may take
            (``driver="threaded"`` only; the other drivers refuse them). A stuck draft
            is abandoned and the run degrades; a stuck target (or a stuck draft that is
            also the target) fails the requests with
            :class:`~ssd_core.LaneTimeoutError`. A stuck call is never closed under:
            its worker releases that model's handles when it returns.
        max_batch: the most requests generating at once; more wait their turn (first
            come, first served). The models' ``max_handles`` lower it further.
        own_thread: ``False`` (sequential driver only): no engine thread; requests
            submitted wait until the caller runs them with :meth:`run_here`.

    Raises:
        ConfigError, UnknownOptionError: bad arguments (nothing is started).
    """

    def __init__(
        self,
        target: Model,
        draft: Model | None = None,
        *,
        mode: str = "ssd",
        config: SSDConfig | None = None,
        driver: str = "threaded",
        source: RandomSource | None = None,
        on_draft_error: str = "degrade",
        draft_timeout: float | None = None,
        target_timeout: float | None = None,
        max_batch: int | None = None,
        own_thread: bool = True,
    ) -> None:
        if not isinstance(own_thread, bool) or (not own_thread and driver != "sequential"):
            raise ConfigError("own_thread=False needs driver='sequential'")
        if max_batch is not None:
            check_int("max_batch", max_batch, minimum=1)
        if mode not in MODES:
            raise UnknownOptionError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if driver not in DRIVERS:
            raise UnknownOptionError(
                f"unknown driver {driver!r}; choose one of {', '.join(DRIVERS)}"
            )
        if on_draft_error not in DRAFT_ERRORS:
            raise UnknownOptionError(
                f"unknown on_draft_error {on_draft_error!r}; choose one of {', '.join(DRAFT_ERRORS)}"
            )
        config = SSDConfig() if config is None else config
        if not isinstance(config, SSDConfig):
            raise ConfigError(f"config must be an SSDConfig, got {type(config).__name__}")
        self.vocab_size = _vocab_size(target, "target")
        self.target_context = _context(target, "target")
        draft_context = None
        if mode != "ar":
            if draft is None:
                raise ConfigError(f"mode {mode!r} needs a draft model")
            draft_vocab = _vocab_size(draft, "draft")
            if draft_vocab != self.vocab_size:
                raise ConfigError(
                    f"draft vocabulary ({getattr(draft, 'name', 'draft')}: {draft_vocab}) does "
                    f"not match the target's ({getattr(target, 'name', 'target')}: {self.vocab_size})"
                )
            draft_context = _context(draft, "draft")
        self.mode = mode
        self.config = config
        self.driver = driver
        self.draft_timeout = _timeout("draft_timeout", draft_timeout)
        self.target_timeout = _timeout("target_timeout", target_timeout)
        if driver != "threaded" and (self.draft_timeout or self.target_timeout):
            raise ConfigError(
                "draft_timeout and target_timeout need driver='threaded' (the other drivers "
                f"call the models on the engine's own thread), got driver={driver!r}"
            )
        self.tokenizer = getattr(target, "tokenizer", None)
        self._models: dict[Lane, Model] = {Lane.TARGET: target}
        if mode != "ar" and draft is not None:
            self._models[Lane.DRAFT] = draft
        #: One Backend per model object (shared by both lanes when target is draft):
        #: its lock, the ledger of the handles it gave out, its logits' array type.
        self._backends: dict[Lane, Backend] = {Lane.TARGET: Backend(target)}
        if Lane.DRAFT in self._models:
            self._backends[Lane.DRAFT] = (
                self._backends[Lane.TARGET]
                if draft is target
                else Backend(self._models[Lane.DRAFT])
            )
        self._draft_budget = config.draft_handles_per_sequence(mode)
        self._custom_source = source is not None
        self._machine = Machine(
            mode=mode,
            config=config,
            vocab_size=self.vocab_size,
            source=source if source is not None else SeededSource(0),
            target_context=self.target_context,
            draft_context=draft_context,
            target_name=str(getattr(target, "name", "target")),
            draft_name=str(getattr(draft, "name", "draft")),
            on_draft_error=on_draft_error,
            cost=CostModel.from_models(target, self._models.get(Lane.DRAFT)),
            # A nearly free draft runs on the engine's thread: its tree is never hidden
            # behind a verification. Decided from the draft's declared costs alone --
            # not the driver, not whether the draft object is the target -- so a
            # request's tokens never depend on either.
            overlap=draft is None or not _cheap(draft),
        )
        self._wake: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the machine against metrics() readers
        #: sid -> handle for every sequence the machine remembers.
        self._handles: dict[int, RequestHandle] = {}
        #: sid -> handle for sequences still generating.
        self._open: dict[int, RequestHandle] = {}
        self._sid_of: dict[int, int] = {}
        #: Finished sequences whose handles the machine has not closed yet.
        self._leaving: set[int] = set()
        #: Submitted, not yet admitted (FIFO): handle, prompt, params, budget, stream.
        self._waiting: deque[tuple[RequestHandle, list[int], SamplingParams, int, Stream]] = deque()
        self.capacity = self._capacity(max_batch)
        self._ids = itertools.count()
        self._stream_index = itertools.count()
        self._thread: threading.Thread | None = None
        self._inline = not own_thread  # run_here: the caller's thread drives the engine
        self._closing = False
        self._closed = False
        self._failed: BaseException | None = None
        self._t0: float | None = None
        self._t_end: float | None = None
        self._virtual_now: float | None = None
        self._stuck: set[Lane] = set()
        self._start_lock = threading.Lock()
        self._workers: dict[int, WorkerExecutor] = {}
        self._by_lane: dict[Lane, WorkerExecutor] = {}
        self._inline_lanes: set[Lane] = set()  # lanes run on the engine's thread

    # -- public -----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(
        self,
        prompt: Sequence[int],
        *,
        sampling: SamplingParams | None = None,
        max_new_tokens: int = 64,
        seed: int | None = None,
    ) -> RequestHandle:
        """Add a request; it joins the next round once prefilled and drafted.

        ``seed`` fixes the request's random draws: the same prompt, parameters and seed
        give the same tokens whatever else is in flight (``None``: a fresh random seed,
        or, with a custom ``source``, that source's own seeding).

        Raises:
            InputError, ConfigError: bad prompt or parameters (nothing is submitted).
            EngineClosedError: the engine has shut down.
        """
        return self.submit_many(
            [prompt], sampling=sampling, max_new_tokens=max_new_tokens, seed=seed
        )[0]

    def submit_many(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        max_new_tokens: int = 64,
        seed: int | None = None,
        on_event: Callable[[StreamEvent | None], None] | None = None,
    ) -> list[RequestHandle]:
        """Add several requests at once (prefilled in one batch). Request ``i`` draws
        from stream ``(seed, i)``, as prompt ``i`` of :func:`~ssd_core.generate` does.

        ``on_event``, if given, is called on the engine's thread with every
        :class:`StreamEvent` of these requests, in commit order, and with ``None`` when
        one of them ends (keep it quick: it runs between rounds).

        Raises:
            InputError, ConfigError: bad prompts or parameters (nothing is submitted).
            EngineClosedError: the engine has shut down.
        """
        checked = check_prompts(prompts, self.vocab_size, self.target_context)
        params = check_sampling(sampling, len(checked), self.vocab_size, self.tokenizer)
        check_int("max_new_tokens", max_new_tokens)
        if seed is not None:
            check_seed(seed)
        if self._closing or self._closed:
            raise EngineClosedError("the engine is closed; start a new one") from self._failed
        self._check_draft_budget(len(checked))
        if seed is None and not self._custom_source:
            seed = secrets.randbits(63)
        entries = []
        out = []
        for i, (prompt, p) in enumerate(zip(checked, params)):
            text = TextTracker(self.tokenizer, p.stop) if self.tokenizer is not None else None
            handle = RequestHandle(self, next(self._ids), i, len(prompt), text)
            handle._tap = on_event
            if seed is not None:
                stream = Stream(seed=seed, index=i)
            else:  # a custom source seeds every draw itself: keep the streams apart
                stream = Stream(seed=None, index=next(self._stream_index))
            entries.append((handle, prompt, p, max_new_tokens, stream))
            out.append(handle)
        self._post(("submit", entries))
        return out

    def metrics(self) -> Metrics:
        """Everything the engine did so far, summed over its requests."""
        with self._lock:
            return self._machine.metrics(driver=self.driver, wall_s=self._wall())

    def close(self, timeout: float | None = None) -> None:
        """Cancel what is in flight, release every handle and thread. Returns after
        ``timeout`` seconds even if a backend call is still running (the engine
        thread then finishes the cleanup when it returns). Idempotent."""
        with self._start_lock:
            if self._thread is None:
                self._closed = True
                return
        self._post(("close",))
        if threading.current_thread() is self._thread:
            return  # called from an on_event callback: the engine stops after this round
        if not self._join(timeout) and timeout != 0:
            log.warning(
                "engine: a backend call is still running after %s s; the engine's thread "
                "releases its handles when it returns",
                timeout,
            )

    def _join(self, timeout: float | None) -> bool:
        """Wait for the engine thread in short slices (so Ctrl-C is never held up);
        returns whether it ended."""
        thread = self._thread
        if thread is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while thread.is_alive():
            left = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
            if left <= 0:
                break
            thread.join(left)
        return not thread.is_alive()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # Ctrl-C inside the block: stop what runs, but give control back promptly.
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.close(timeout=INTERRUPT_WAIT_S if interrupted else None)

    # -- internals ----------------------------------------------------------------------

    def _capacity(self, max_batch: int | None) -> int:
        """The most sequences that may run at once: ``max_batch`` and what the models'
        ``max_handles`` allow (a target handle per sequence, draft handles per
        :meth:`SSDConfig.draft_handles_per_sequence`)."""
        cap = max_batch if max_batch is not None else 1 << 30
        for lane, model in self._models.items():
            limit = getattr(model, "max_handles", None)
            if not isinstance(limit, int) or isinstance(limit, bool):
                continue
            per_seq = 1 if lane is Lane.TARGET else self._draft_budget
            if self._models.get(Lane.DRAFT) is self._models[Lane.TARGET]:
                per_seq = 1 + self._draft_budget  # one model holds both lanes' handles
            cap = min(cap, limit // max(per_seq, 1))
        return cap

    def _check_draft_budget(self, batch: int) -> None:
        """A batch submitted together must fit together (``generate`` promises one)."""
        if batch <= self.capacity:
            return
        draft = self._models.get(Lane.DRAFT)
        target = self._models[Lane.TARGET]
        if self.capacity == 0:
            raise ConfigError(
                f"{self.mode} with fan-out {self.config.tree_budget()} keeps "
                f"{self._draft_budget} draft handles per sequence, more than the draft "
                f"({getattr(draft, 'name', 'draft')}) holds at once "
                f"({getattr(draft, 'max_handles', None)}); lower the fan-out or raise the "
                "draft's handle limit (llama.cpp: n_seq_max)"
            )
        limit = getattr(draft, "max_handles", None)
        raise ConfigError(
            f"{self.mode} with fan-out {self.config.tree_budget()} for {batch} sequence(s) keeps "
            f"up to {batch * self._draft_budget} draft handles open, but the draft "
            f"({getattr(draft, 'name', 'draft')}) holds at most {limit} and the target "
            f"({getattr(target, 'name', 'target')}) {getattr(target, 'max_handles', None)}: "
            f"at most {self.capacity} sequences at once; lower the fan-out or the batch, or "
            "raise the handle limits (llama.cpp: n_seq_max)"
        )

    def _post(self, msg: Any) -> None:
        # Under the lock the engine thread takes to mark itself closed before its last
        # drain of the queue: a message is either drained or refused, never left there.
        with self._start_lock:
            if self._closed:
                if msg[0] == "submit":
                    raise EngineClosedError(
                        "the engine is closed; start a new one"
                    ) from self._failed
                return
            if msg[0] == "cancel" and self._thread is None:
                return
            self._wake.put(msg)
            if self._thread is None and not self._inline:
                self._t0 = time.perf_counter()
                if self.driver == "threaded":
                    self._start_workers()  # every thread exists once submit returns
                self._thread = threading.Thread(target=self._serve, name="ssd-engine", daemon=True)
                self._thread.start()

    def _wall(self) -> float:
        if self._virtual_now is not None:
            return self._virtual_now
        if self._t0 is None:
            return 0.0
        return (self._t_end or time.perf_counter()) - self._t0

    def run_here(self) -> None:
        """Run the sequential driver in the calling thread until every request
        submitted so far has ended, then shut the engine down: one thread from start
        to end, so a profiler or a per-thread counter sees every backend call. The
        price: Ctrl-C waits for a backend call that blocks (elsewhere the engine's own
        thread makes the calls, and the caller gets control back within
        ``INTERRUPT_WAIT_S``). A ``KeyboardInterrupt`` is raised again after the
        cleanup.

        Raises:
            MachineError: the engine was not made with ``own_thread=False``, or it
                already ran.
        """
        if not self._inline or self._t0 is not None:
            from ._errors import MachineError

            raise MachineError("run_here needs Engine(..., own_thread=False), run once")
        self._t0 = time.perf_counter()
        exc = self._serve()
        if exc is not None and not isinstance(exc, Exception):
            raise exc

    def _serve(self) -> BaseException | None:
        error: BaseException | None = None
        try:
            {"sequential": self._drive_sequential, "threaded": self._drive_threaded,
             "simulated": self._drive_simulated}[self.driver]()  # fmt: skip
        except BaseException as exc:
            error = exc
            self._fail_all(exc)
        finally:
            self._t_end = time.perf_counter()
            self._cleanup()
            with self._start_lock:  # from here on _post refuses (see there)
                self._closing = self._closed = True
            # Anything submitted after the shutdown began is refused, never dropped.
            while True:
                try:
                    msg = self._wake.get_nowait()
                except queue.Empty:
                    break
                if msg[0] == "submit":
                    for handle, *_ in msg[1]:
                        self._refuse(handle)
        return error

    # messages -------------------------------------------------------------------------

    def _apply(self, msg: Any) -> None:
        kind = msg[0]
        m = self._machine
        with self._lock:
            if kind == "submit":
                if self._closing:
                    for handle, *_ in msg[1]:
                        self._refuse(handle)
                    return
                self._waiting.extend(msg[1])
            elif kind == "cancel":
                sid = self._sid_of.get(msg[1])
                if sid is not None:
                    m.finish(sid, "cancelled")
                else:
                    for entry in self._waiting:
                        if entry[0].id == msg[1]:
                            self._waiting.remove(entry)
                            entry[0]._finish(entry[0]._partial("cancelled", None))
                            break
            elif kind == "close":
                self._closing = True
                for sid in list(self._open):
                    m.finish(sid, "cancelled")
                for entry in self._waiting:
                    entry[0]._finish(entry[0]._partial("cancelled", None))
                self._waiting.clear()
            self._admit()
            self._publish()

    def _admit(self) -> None:
        """Move waiting requests into the machine while there is room (called with the
        lock held): at most ``capacity`` sequences run at once."""
        m = self._machine
        while self._waiting and len(self._open) < self.capacity:
            handle, prompt, params, max_new, stream = self._waiting.popleft()
            stops = stop_ids_for(params, self.tokenizer)
            sid = m.add(prompt, params, max_new_tokens=max_new, stream=stream, stop_ids=stops)
            self._handles[sid] = handle
            self._open[sid] = handle
            self._sid_of[handle.id] = sid

    def _drain(self, *, block: bool) -> Any:
        """Apply queued messages; with ``block``, wait for one first. Returns a
        completion message, if that is what arrived."""
        while True:
            try:
                msg = self._wake.get(timeout=None) if block else self._wake.get_nowait()
            except queue.Empty:
                return None
            block = False
            if msg[0] == "done":
                return msg
            self._apply(msg)

    def _publish(self) -> None:
        """Hand the machine's events to their requests (called with the lock held)."""
        m = self._machine
        while events := m.pop_events():
            for ev in events:
                self._publish_one(ev)
        for sid in list(self._leaving):
            if m.sequence(sid).stage is Stage.CLOSED:
                m.forget(sid)
                self._leaving.discard(sid)
                handle = self._handles.pop(sid)
                self._sid_of.pop(handle.id, None)
        if self._waiting:
            self._admit()

    def _publish_one(self, ev: TokensCommitted | Finished) -> None:
        m = self._machine
        handle = self._handles.get(ev.sid)
        if handle is None:
            return
        if isinstance(ev, TokensCommitted):
            toks = ev.tokens
            text = None
            if handle._text is not None:
                text = handle._text.add(toks)
                stopped = handle._text.stopped
                if stopped is not None:
                    keep = stopped[0] - len(handle._tokens)
                    toks = toks[: max(keep, 0)]
                    m.finish(ev.sid, "stop", keep=stopped[0])
            if toks or text:
                handle._push(toks, text)
        elif isinstance(ev, Finished):
            self._open.pop(ev.sid, None)
            self._leaving.add(ev.sid)
            stop = None
            if handle._text is not None:
                rest = handle._text.finish()
                if rest:
                    handle._push((), rest)
                if handle._text.stopped is not None:
                    stop = handle._text.stopped[2]
            handle._finish(handle._partial(ev.reason, m.request_metrics(ev.sid), stop))

    # drivers --------------------------------------------------------------------------

    def _done_when_idle(self) -> bool:
        return self._closing and self._machine.idle

    def _lane_fault(self, lane: Lane, exc: BaseException) -> None:
        with self._lock:
            self._machine.fault(lane, exc)  # raises unless the draft lane was dropped
            self._publish()
        # The draft lane is lost: its handles go now (a stuck one's when its call ends).
        if lane is Lane.DRAFT and lane not in self._stuck:
            self._backends[lane].close(lane)

    def _drive_sequential(self) -> None:
        m = self._machine
        lanes = [lane for lane in (Lane.DRAFT, Lane.TARGET) if lane in self._models]
        while True:
            self._drain(block=False)
            if self._done_when_idle():
                return
            for lane in lanes:
                with self._lock:
                    req = m.next_request(lane)
                if req is None:
                    continue
                try:
                    result, elapsed = self._backends[lane].call(req)
                except Exception as exc:
                    self._lane_fault(lane, exc)
                    break
                with self._lock:
                    m.deliver(req, result, elapsed)
                    self._publish()
                break
            else:
                if not m.idle:
                    raise InternalError(f"the machine is stuck with nothing to do: {m.state}")
                if self._inline:
                    return  # run_here: everything submitted has ended
                self._t_end = time.perf_counter()
                self._drain(block=True)
                self._t_end = None

    def _drive_simulated(self) -> None:
        m = self._machine
        lanes = [lane for lane in (Lane.DRAFT, Lane.TARGET) if lane in self._models]
        clock = SimulatedClock()
        self._virtual_now = 0.0
        busy: set[Lane] = set()
        while True:
            self._drain(block=False)
            if self._done_when_idle():
                return
            for lane in lanes:
                if lane in busy:
                    continue
                with self._lock:
                    req = m.next_request(lane)
                if req is not None:
                    clock.start(lane, self._backends[lane], req)
                    busy.add(lane)
            if not clock:
                if not m.idle:
                    raise InternalError(f"the machine is stuck with nothing to do: {m.state}")
                self._drain(block=True)
                continue
            lane, req, result, cost, exc = clock.pop()
            busy.discard(lane)
            self._virtual_now = clock.now
            if m.outstanding(lane) is not req:  # the lane was dropped meanwhile
                self._close_stray(lane, req, result)
                continue
            if exc is not None:
                self._lane_fault(lane, exc)
                continue
            with self._lock:
                m.deliver(req, result, cost)
                self._publish()

    def _start_workers(self) -> None:
        """One worker thread per model (one for both lanes when target is draft)."""
        workers: dict[int, WorkerExecutor] = {}
        by_lane: dict[Lane, WorkerExecutor] = {}
        # A draft that declares itself nearly free (the n-gram draft) runs on the
        # engine's thread: a worker's two hand-offs per job would cost more than its work.
        self._inline_lanes = {
            lane
            for lane in (Lane.DRAFT,)
            if lane in self._backends
            and self._backends[lane] is not self._backends[Lane.TARGET]
            and _cheap(self._models[lane])
        }
        for lane in (Lane.DRAFT, Lane.TARGET):
            backend = self._backends.get(lane)
            if backend is None or lane in self._inline_lanes:
                continue
            if id(backend) not in workers:
                workers[id(backend)] = WorkerExecutor(backend, self._wake, f"ssd-{lane.value}")
            by_lane[lane] = workers[id(backend)]
        self._workers, self._by_lane = workers, by_lane

    def _drive_threaded(self) -> None:
        m = self._machine
        lanes = [lane for lane in (Lane.DRAFT, Lane.TARGET) if lane in self._models]
        by_lane = self._by_lane
        inline = self._inline_lanes
        running: dict[Lane, Job] = {}
        self._running = running
        while True:
            msg = self._drain(block=False)
            if msg is None:
                if self._done_when_idle() and not running:
                    return
                ran = False
                for lane in lanes:
                    if lane in inline:
                        ran = self._run_inline(lane) or ran
                        continue
                    ex = by_lane[lane]
                    if lane in running or ex.busy or ex.abandoned or lane in self._stuck:
                        continue
                    with self._lock:
                        job = m.next_job(lane)
                    if job is not None:
                        running[lane] = job
                        ex.submit(job, lane)
                if ran:
                    continue  # an inline job may have made more work: look again first
                if not running:
                    if not m.idle:
                        raise InternalError(f"the machine is stuck with nothing to do: {m.state}")
                    self._t_end = time.perf_counter()
                    msg = self._drain(block=True)
                    self._t_end = None
                    if msg is None:
                        continue
                else:
                    try:
                        msg = self._wake.get(timeout=self._until_deadline(running, by_lane))
                    except queue.Empty:
                        self._check_timeouts(running, by_lane)
                        continue
                    if msg[0] != "done":
                        self._apply(msg)
                        continue
            _, lane, job, exc = msg
            assert isinstance(job, Job)
            ex = by_lane[lane]
            if running.get(lane) is not job:  # a job of a lane given up on: ignore it
                continue
            del running[lane]
            ex.busy = False
            if exc is not None:
                self._lane_fault(lane, exc)
                continue
            with self._lock:
                m.complete(job)
                self._publish()

    def _run_inline(self, lane: Lane) -> bool:
        """Run ``lane``'s next job on this thread, if it has one (one at a time, so
        messages -- a cancel, a new request -- are seen between jobs); whether one ran."""
        m = self._machine
        if lane in self._stuck:
            return False
        with self._lock:
            job = m.next_job(lane)
        if job is None:
            return False
        try:
            run_job(self._backends[lane], job)
        except Exception as exc:
            self._lane_fault(lane, exc)
            return True
        with self._lock:
            m.complete(job)
            self._publish()
        return True

    def _until_deadline(
        self, running: dict[Lane, Job], by_lane: dict[Lane, WorkerExecutor]
    ) -> float | None:
        soonest = None
        for lane in running:
            limit = self.target_timeout if lane is Lane.TARGET else self.draft_timeout
            started = by_lane[lane].call_started
            if limit is None or not started:
                if limit is not None:
                    soonest = limit if soonest is None else min(soonest, limit)
                continue
            left = started + limit - time.monotonic()
            soonest = left if soonest is None else min(soonest, left)
        return None if soonest is None else max(soonest, 0.001)

    def _check_timeouts(
        self, running: dict[Lane, Job], by_lane: dict[Lane, WorkerExecutor]
    ) -> None:
        now = time.monotonic()
        for lane in list(running):
            limit = self.target_timeout if lane is Lane.TARGET else self.draft_timeout
            ex = by_lane[lane]
            started = ex.call_started
            if limit is None or not started or now - started < limit:
                continue
            # Give up on the call: the worker closes this model's handles once it
            # returns (never under it) and ends; the engine does not wait for it.
            backend = self._backends[lane]
            ex.abandon(then=backend.close_all)
            del running[lane]
            shared = [ln for ln in self._backends if self._backends[ln] is backend]
            self._stuck.update(shared)
            name = backend.name
            if lane is Lane.TARGET:
                self._lane_fault(
                    lane,
                    LaneTimeoutError(f"the target ({name}) did not answer within {limit} s"),
                )
            elif len(shared) > 1:
                # The draft is the target: there is no lane left to degrade to.
                self._lane_fault(
                    Lane.TARGET,
                    LaneTimeoutError(
                        f"the draft ({name}), which is also the target, did not answer "
                        f"within {limit} s"
                    ),
                )
            else:
                self._lane_fault(
                    lane, TimeoutError(f"the draft ({name}) did not answer within {limit} s")
                )

    # failure and cleanup --------------------------------------------------------------

    def _fail_all(self, exc: BaseException) -> None:
        self._failed = exc
        with self._lock:
            m = self._machine
            if m.state is not MachineState.ERROR:
                m.fail(exc)
            for handle in list(self._open.values()):
                partial = handle._partial(None, None)
                err: GenerationError
                if isinstance(exc, LaneTimeoutError):
                    err = LaneTimeoutError(str(exc), partial)
                else:
                    err = GenerationError(f"generation failed: {exc!r}", partial)
                err.__cause__ = exc
                handle._fail(err)
            self._open.clear()
            # Requests still waiting for a slot never ran: they fail the same way, with
            # nothing committed.
            while self._waiting:
                self._refuse(self._waiting.popleft()[0])

    def _refuse(self, handle: RequestHandle) -> None:
        """Fail a request that was accepted but never ran: with the engine's failure (a
        GenerationError with nothing committed) if it failed, else EngineClosedError."""
        exc = self._failed
        err: BaseException
        if exc is None or isinstance(exc, EngineClosedError):
            err = EngineClosedError("the engine closed before this request ran")
        else:
            err = GenerationError(
                f"the engine failed before this request ran: {exc!r}", handle._partial(None, None)
            )
            err.__cause__ = exc
        handle._fail(err)

    def _close_stray(self, lane: Lane, req: Any, result: Any) -> None:
        """A result of a lane that was dropped meanwhile: close what it made."""
        if isinstance(req, (Open, Fork)) and result and lane not in self._stuck:
            self._backends[lane].close(lane, tuple(result))

    def _cleanup(self) -> None:
        """Wait for work still running (never close a handle under a live call), then
        close every handle the models gave this engine -- each exactly once, from the
        backends' ledgers -- and stop the workers. A stuck model's worker does the same
        for its model when its call returns."""
        running: dict[Lane, Job] = getattr(self, "_running", {})
        workers = self._workers
        while any(lane not in self._stuck for lane in running):
            msg = self._wake.get()
            if msg[0] == "done" and running.get(msg[1]) is msg[2]:
                del running[msg[1]]
            elif msg[0] == "submit":
                for handle, *_ in msg[1]:
                    self._refuse(handle)
        for lane, backend in self._backends.items():
            if lane not in self._stuck:
                backend.close(lane)
        for ex in workers.values():
            if not ex.abandoned:
                ex.close()
        if self._open or self._waiting:
            self._fail_all(EngineClosedError("the engine stopped with requests in flight"))
