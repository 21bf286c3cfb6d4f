"""The one-call entry points: :func:`generate` and :func:`stream`, thin wrappers over a
private :class:`~ssd_core.Engine` that lives for the call."""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import Any

import attrs

from ._config import SamplingParams, SSDConfig, check_int, check_seed
from ._engine import (
    INTERRUPT_WAIT_S,
    Engine,
    RequestHandle,
    StreamEvent,
    check_prompts,
    check_sampling,
)
from ._errors import GenerationError
from ._metrics import Metrics
from ._protocol import Model
from ._random import RandomSource, SeededSource

__all__ = ["GenerateResult", "Stream", "generate", "stream"]

_POLL_S = 0.1


@attrs.frozen(kw_only=True)
class GenerateResult:
    """What :func:`generate` returns.

    Attributes:
        tokens: generated tokens only, one list per prompt, in input order.
        finish_reasons: ``"stop"`` (stop id, sequence or string) or ``"length"``
            (``max_new_tokens`` or the context size), per prompt; ``None`` for a prompt
            the run had not finished when it failed.
        metrics: the run's :class:`~ssd_core.Metrics`.
        texts: detokenised ``tokens`` when the target has a tokenizer, else ``None``.
    """

    tokens: list[list[int]]
    finish_reasons: list[str | None]
    metrics: Metrics
    texts: list[str] | None = None


class _Call:
    """Validated inputs and the private engine for one call."""

    def __init__(
        self,
        target: Model,
        draft: Model | None,
        prompts: Sequence[Sequence[int]],
        *,
        mode: str,
        max_new_tokens: int,
        sampling: SamplingParams | Sequence[SamplingParams] | None,
        config: SSDConfig | None,
        driver: str,
        seed: int,
        source: RandomSource | None,
        on_draft_error: str,
        draft_timeout: float | None = None,
        target_timeout: float | None = None,
    ) -> None:
        # Everything is checked before the engine starts: bad input never costs a call.
        self.engine = Engine(
            target, draft, mode=mode, config=config, driver=driver,
            source=source if source is not None else SeededSource(check_seed(seed)),
            on_draft_error=on_draft_error, draft_timeout=draft_timeout,
            target_timeout=target_timeout,
        )  # fmt: skip
        check_int("max_new_tokens", max_new_tokens)
        checked = check_prompts(prompts, self.engine.vocab_size, self.engine.target_context)
        params = check_sampling(
            sampling, len(checked), self.engine.vocab_size, self.engine.tokenizer
        )
        self.engine._check_draft_budget(len(checked))
        self.tokenizer = self.engine.tokenizer
        self.prompts, self.params = checked, params
        self.max_new_tokens = max_new_tokens
        self.seed = None if source is not None else seed
        self.handles: list[RequestHandle] = []

    def start(self, tap: Any = None) -> None:
        self.handles = self.engine.submit_many(
            self.prompts,
            sampling=self.params,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            on_event=tap,
        )

    def result(self) -> GenerateResult:
        """Tokens and metrics so far (complete once every request ended)."""
        tokens, reasons = [], []
        for h in self.handles:
            tokens.append(list(h.tokens))
            r = h._result
            reasons.append(r.finish_reason if r is not None else None)
        texts = None
        if self.tokenizer is not None:
            texts = []
            for h, toks in zip(self.handles, tokens):
                r = h._result
                texts.append(
                    r.text if r is not None and r.text is not None else self.tokenizer.decode(toks)
                )
        return GenerateResult(
            tokens=tokens,
            finish_reasons=reasons,
            metrics=self.engine.metrics(),
            texts=texts,
        )

    def wait_all(self) -> None:
        try:
            for h in self.handles:
                h.result()
        except GenerationError as exc:
            self.engine.close()
            # The same type (a LaneTimeoutError stays one), with the whole call's partial.
            raise type(exc)(str(exc), self.result()) from exc.__cause__
        self.engine.close()


class Stream:
    """The iterator :func:`stream` returns: :class:`StreamEvent` values as rounds
    commit tokens; :meth:`result` once it is exhausted; :meth:`cancel` (from any
    thread) or :meth:`close` (or leaving a ``with`` block, or dropping it) to stop
    early, which releases every handle and thread.

    Raises (while iterating):
        GenerationError: the run failed; ``partial`` keeps every committed token.
    """

    def __init__(self, call: _Call) -> None:
        self._call = call
        self._queue: queue.SimpleQueue[StreamEvent | None] = queue.SimpleQueue()
        self._pending = len(call.prompts)
        self._finished = False
        self._lock = threading.Lock()
        call.start(tap=self._queue.put)

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> StreamEvent:
        try:
            return self._next()
        except (StopIteration, GenerationError):
            raise
        except BaseException:  # Ctrl-C while waiting: stop the run, give control back
            self._interrupt()
            raise

    def _next(self) -> StreamEvent:
        while self._pending:
            try:
                ev = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if ev is None:
                self._pending -= 1
                continue
            if ev.tokens:
                return ev
        self._end()
        raise StopIteration

    def _end(self) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self._call.wait_all()  # closes the engine, also when it raises GenerationError

    def _interrupt(self) -> None:
        """Cancel every request and wait (briefly) for the engine: it finishes the
        cleanup on its own thread when a backend call still running returns."""
        self._pending = 0
        self.cancel()
        self._call.engine.close(timeout=INTERRUPT_WAIT_S)

    def cancel(self) -> None:
        """Stop every sequence of this stream (safe from any thread)."""
        for h in self._call.handles:
            h.cancel()

    def close(self) -> None:
        """Stop now and release everything (handles, threads)."""
        self.cancel()
        self._call.engine.close()
        self._pending = 0

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Dropped without close(): stop the run; the engine's thread releases every
        # handle and thread on its own (nothing here waits for it).
        try:
            engine = self._call.engine
        except AttributeError:
            return
        if not engine.closed:
            engine.close(timeout=0.0)

    def result(self) -> GenerateResult:
        """Tokens and metrics so far (complete once the stream is exhausted)."""
        return self._call.result()

    @property
    def finished(self) -> bool:
        return self._finished


def stream(
    target: Model,
    draft: Model | None = None,
    *,
    prompts: Sequence[Sequence[int]],
    mode: str = "ssd",
    max_new_tokens: int = 64,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    config: SSDConfig | None = None,
    driver: str = "sequential",
    seed: int = 0,
    source: RandomSource | None = None,
    on_draft_error: str = "degrade",
    draft_timeout: float | None = None,
    target_timeout: float | None = None,
) -> Stream:
    """Generate like :func:`generate`, yielding tokens as each round commits them.

    Every input is validated when ``stream`` is called, before any model call; the
    run starts at once and its events wait for the reader.

    Returns:
        A :class:`Stream` of :class:`StreamEvent` values (prompt index, newly
        committed tokens, new text); ``.result()`` gives the :class:`GenerateResult`.

    Raises:
        ConfigError, InputError, UnknownOptionError: bad arguments (before any work).
        GenerationError: while iterating, when the run fails (``partial`` keeps what
            was committed).
    """
    call = _Call(
        target, draft, prompts, mode=mode, max_new_tokens=max_new_tokens, sampling=sampling,
        config=config, driver=driver, seed=seed, source=source, on_draft_error=on_draft_error,
        draft_timeout=draft_timeout, target_timeout=target_timeout,
    )  # fmt: skip
    return Stream(call)


def generate(
    target: Model,
    draft: Model | None = None,
    *,
    prompts: Sequence[Sequence[int]],
    mode: str = "ssd",
    max_new_tokens: int = 64,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    config: SSDConfig | None = None,
    driver: str = "sequential",
    seed: int = 0,
    source: RandomSource | None = None,
    on_draft_error: str = "degrade",
    draft_timeout: float | None = None,
    target_timeout: float | None = None,
) -> GenerateResult:
    """Generate up to ``max_new_tokens`` tokens for each prompt, exactly as the target
    would, using the draft to go faster.

    Args:
        target: the model whose distribution the output follows exactly.
        draft: the speculator (ignored, and may be ``None``, in ``"ar"`` mode).
        prompts: token-id lists, each non-empty and within the target's context.
        mode: ``"ar"`` (target only), ``"sd"`` (speculative decoding) or ``"ssd"``
            (speculative speculative decoding, Saguaro).
        max_new_tokens: generation budget per prompt.
        sampling: one :class:`SamplingParams` for all prompts or one per prompt.
        config: :class:`SSDConfig` (K, fan-out, Saguaro C, fallback).
        driver: ``"sequential"``, ``"threaded"`` or ``"simulated"``.
        seed: seeds the random draws; prompt ``i`` draws from stream ``(seed, i)``, so
            the same seed gives the same tokens under every driver and whatever else
            runs (``fallback="auto"``, which follows measured times, excepted).
        source: a custom random source (overrides ``seed``).
        on_draft_error: ``"degrade"`` (a failing draft is dropped; generation goes on
            target-only, exactly) or ``"raise"``.
        draft_timeout / target_timeout: seconds one backend call on that lane may take
            (``driver="threaded"`` only): a stuck draft is abandoned and the run
            degrades; a stuck target raises :class:`~ssd_core.LaneTimeoutError`.

    Returns:
        A :class:`GenerateResult`.

    Raises:
        ConfigError, InputError, UnknownOptionError: bad arguments, before any model call.
        GenerationError: a backend failed mid-run; ``.partial`` keeps what was generated.
    """
    call = _Call(
        target, draft, prompts, mode=mode, max_new_tokens=max_new_tokens, sampling=sampling,
        config=config, driver=driver, seed=seed, source=source, on_draft_error=on_draft_error,
        draft_timeout=draft_timeout, target_timeout=target_timeout,
    )  # fmt: skip
    try:
        call.start()
        call.wait_all()
    except BaseException:
        # Ctrl-C (or any error) while waiting: cancel and give control back within
        # INTERRUPT_WAIT_S; a backend call still running is waited for on the engine's
        # thread, which closes the handles after it returns, never under it.
        call.engine.close(timeout=INTERRUPT_WAIT_S)
        raise
    return call.result()
