"""The OpenAI-compatible HTTP application over one running :class:`ssd_core.Engine`.

Theory of operation. The app holds one engine for its whole life. A request is
validated (pydantic, then the engine's own checks at :meth:`Engine.submit_many`),
admitted if there is room (``engine.capacity`` generating plus ``max_queue`` waiting;
past that it is answered 429 at once, never left to hang), and submitted. Its
:class:`~ssd_core.RequestHandle` values are read with ``async for`` on the event loop:
the engine wakes the loop with ``call_soon_threadsafe``, so no thread is spent per
request. A client that goes away cancels its request (Starlette tells a streaming
response; a non-streaming one watches the connection itself), and the engine closes
the request's model handles within one round.

On shutdown (:meth:`ServerState.begin_drain`) new requests get 503; those in flight
get ``shutdown_timeout`` seconds to finish, then are cancelled and answered with an
error (a 503, or an error event on a stream).

Response shapes follow the OpenAI API. Extensions, all ignored by OpenAI clients:
every choice carries ``token_ids`` (its tokens, or the tokens of a streamed delta) and,
when it ends, ``ssd`` -- the request's engine metrics
(:meth:`ssd_core.RequestMetrics.as_dict`) plus ``first_token_s``, ``total_s`` and the
``stop`` string that ended it. For a model without a tokenizer (id-only), ``text`` is
the token ids separated by spaces, as ``ssd generate`` prints them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send

from ssd_core import (
    ConfigError,
    Engine,
    GenerationError,
    Model,
    RequestHandle,
    RequestResult,
    SamplingParams,
    SSDError,
    StreamEvent,
)

from .errors import ApiError, from_ssd_error, install_error_handlers
from .metrics import ServerMetrics
from .options import ServeOptions
from .schemas import ChatRequest, CompletionRequest, _Sampling

__all__ = ["ServerState", "create_app"]

log = logging.getLogger("ssd_core.app.serve")

#: What a pump hands the response: an event, the end, or the failure.
_Item = tuple[int, StreamEvent | RequestResult | BaseException]


class ServerState:
    """What the routes share: the engine, the requests in flight, the metrics.

    Args:
        engine: the running engine (the server never closes it; its owner does).
        target: the engine's target (for its tokenizer and chat template).
        options: the server's settings.
        draft_name: shown in ``/v1/models`` and the metrics.
    """

    def __init__(
        self, engine: Engine, target: Model, options: ServeOptions, *, draft_name: str | None
    ) -> None:
        self.engine = engine
        self.target = target
        self.options = options
        self.model_name = options.served_model_name or str(getattr(target, "name", "model"))
        self.tokenizer = engine.tokenizer
        self.draft_name = draft_name
        self.created = int(time.time())
        #: Handles submitted and not yet ended (pruned lazily).
        self.active: set[RequestHandle] = set()
        self.draining = False
        self.shutdown_cancelled = False
        #: The first generation failure: the engine fails every request and closes.
        self.failure: BaseException | None = None
        cfg = engine.config
        self.metrics = ServerMetrics(
            engine,
            self.load,
            {
                "model": self.model_name,
                "target": str(getattr(target, "name", "target")),
                "draft": draft_name or "",
                "mode": engine.mode,
                "k": str(cfg.k),
                "fanout": str(cfg.fanout),
                "fallback": cfg.fallback,
                "driver": engine.driver,
            },
        )

    # -- load and admission -----------------------------------------------------------

    def load(self) -> tuple[int, int]:
        """(requests generating, requests waiting for a slot). The engine admits first
        come, first served up to ``capacity``; what the server submitted beyond that
        waits in the engine's queue."""
        self.active = {h for h in self.active if not h.done}
        running = min(len(self.active), self.engine.capacity)
        return running, len(self.active) - running

    def admit(self, count: int) -> None:
        """Refuse a request of ``count`` sequences that cannot be taken now.

        Raises:
            ApiError: 503 while shutting down or after the engine stopped; 400 when
                ``count`` can never fit in one batch; 429 when the queue is full.
        """
        if self.draining:
            raise ApiError(503, "the server is shutting down", code="server_shutting_down")
        if self.engine_down:
            raise ApiError(503, "the engine has stopped; see the server log", code="engine_closed")
        capacity = self.engine.capacity
        if count > capacity:
            raise ApiError(
                400,
                f"this request asks for {count} sequences (prompts x n) but the server "
                f"generates at most {capacity} at once",
                param="n",
                code="too_many_sequences",
            )
        running, waiting = self.load()
        limit = capacity + self.options.max_queue
        if running + waiting + count > limit:
            raise ApiError(
                429,
                f"the server is full ({running} requests generating, {waiting} waiting, "
                f"queue limit {self.options.max_queue}); retry later",
                code="queue_full",
                headers={"Retry-After": "1"},
            )

    @property
    def engine_down(self) -> bool:
        """The engine failed (it is closing, or closed) or was closed."""
        return self.failure is not None or self.engine.closed

    # -- shutdown -----------------------------------------------------------------------

    def begin_drain(self, timeout: float) -> None:
        """Stop taking requests; cancel those still running after ``timeout`` seconds.
        Call on the event loop."""
        if self.draining:
            return
        self.draining = True
        n = sum(self.load())
        log.info("shutting down: %d request(s) in flight get %.1f s to finish", n, timeout)
        asyncio.get_running_loop().call_later(timeout, self.cancel_all)

    def cancel_all(self) -> None:
        """Cancel every request in flight (their clients get an error)."""
        self.shutdown_cancelled = True
        for h in list(self.active):
            if not h.done:
                h.cancel()


# -- building requests ------------------------------------------------------------------


def _sampling(state: ServerState, req: _Sampling) -> SamplingParams:
    d = state.options.defaults
    stop = req.stop if req.stop is not None else ()
    if stop and state.tokenizer is None:
        raise ApiError(
            400,
            f"stop strings need a model with a tokenizer; {state.model_name!r} is id-only "
            "(use stop_token_ids)",
            param="stop",
            code="invalid_value",
        )
    stop_ids = None
    if req.stop_token_ids is not None:
        vocab = state.engine.vocab_size
        bad = [t for t in req.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(
                400,
                f"stop_token_ids holds {bad[0]}, outside the vocabulary [0, {vocab})",
                param="stop_token_ids",
                code="invalid_value",
            )
        # As vLLM: these end a choice besides the end-of-sequence ids (unless ignore_eos).
        eos = () if req.ignore_eos or state.tokenizer is None else state.tokenizer.eos_token_ids
        stop_ids = tuple(dict.fromkeys([*req.stop_token_ids, *eos]))
    try:
        return SamplingParams(
            temperature=d.temperature if req.temperature is None else req.temperature,
            top_p=d.top_p if req.top_p is None else req.top_p,
            top_k=d.top_k if req.top_k is None else max(req.top_k, 0),
            min_p=d.min_p if req.min_p is None else req.min_p,
            draft_temperature=d.draft_temperature,
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            stop_token_ids=stop_ids,
            ignore_eos=req.ignore_eos,
        )
    except ConfigError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from exc


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise ApiError(
            404,
            f"the model {name!r} does not exist; this server serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )


def _completion_prompts(state: ServerState, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt", code="invalid_value")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if isinstance(prompt[0], list):
        return [list(p) for p in prompt]
    tok = state.tokenizer
    if tok is None:
        raise ApiError(
            400,
            f"the model {state.model_name!r} has no tokenizer: give the prompt as token ids "
            "(a list of ints, or a list of such lists)",
            param="prompt",
            code="invalid_value",
        )
    return [list(tok.encode(text)) for text in prompt]


def _chat_prompt(state: ServerState, req: ChatRequest) -> list[int]:
    template = getattr(state.target, "apply_chat_template", None)
    if template is None or state.tokenizer is None:
        raise ApiError(
            400,
            f"the model {state.model_name!r} has no chat template (it is an id-only model); "
            "use /v1/completions with token-id prompts",
            param="messages",
            code="chat_not_supported",
        )
    try:
        return list(template([m.as_template_dict() for m in req.messages]))
    except SSDError as exc:
        raise ApiError(400, str(exc), param="messages", code="invalid_value") from exc


def _submit(state: ServerState, prompts: list[list[int]], req: _Sampling) -> list[RequestHandle]:
    _check_model(state, req.model)
    params = _sampling(state, req)
    d = state.options.defaults
    budget = req.token_budget
    seed = req.seed if req.seed is not None else d.seed
    state.admit(len(prompts) * req.n)
    flat = [p for p in prompts for _ in range(req.n)]
    try:
        handles = state.engine.submit_many(
            flat,
            sampling=params,
            max_new_tokens=d.max_tokens if budget is None else budget,
            seed=seed,
        )
    except SSDError as exc:
        raise from_ssd_error(exc) from exc
    state.active.update(handles)
    state.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
    return handles


# -- reading requests -------------------------------------------------------------------


async def _pump(
    state: ServerState, route: str, index: int, handle: RequestHandle, out: Callable[[_Item], None]
) -> None:
    """Hand one request's events, then its result (or failure), to ``out``."""
    last: float | None = None
    try:
        async for ev in handle:
            if ev.tokens:
                now = time.perf_counter()
                if last is not None:
                    state.metrics.itl.observe(now - last)
                last = now
            out((index, ev))
        result = handle.result(timeout=0.0)
        state.metrics.finished(route, result)
        out((index, result))
    except GenerationError as exc:
        if state.failure is None:
            log.error("generation failed; the engine is stopping: %s", exc)
            state.failure = exc
        out((index, exc))


def _text_of(state: ServerState, tokens: Sequence[int], text: str | None, first: bool) -> str:
    if state.tokenizer is not None:
        return text or ""
    ids = " ".join(str(t) for t in tokens)
    return ids if first or not ids else " " + ids


def _ssd_block(result: RequestResult) -> dict[str, Any]:
    out: dict[str, Any] = result.metrics.as_dict() if result.metrics is not None else {}
    out.update(first_token_s=result.first_token_s, total_s=result.total_s, stop=result.stop)
    return out


def _usage(prompts: list[list[int]], completion: int) -> dict[str, int]:
    prompt = sum(len(p) for p in prompts)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _failure(state: ServerState, exc: BaseException | None) -> ApiError:
    if exc is None:  # cancelled by the shutdown
        return ApiError(
            503, "the server shut down before this request finished", code="server_shutting_down"
        )
    return ApiError(500, f"generation failed: {exc}", code="generation_failed")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _EventStream(StreamingResponse):
    """A server-sent-event response that cancels its requests however it ends
    (finished, client gone, server shutting down, or never started)."""

    def __init__(self, content: AsyncIterator[str], handles: list[RequestHandle]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._handles = handles

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for h in self._handles:
                if not h.done:
                    h.cancel()


async def _watch_disconnect(request: Request, handles: list[RequestHandle]) -> None:
    """Cancel ``handles`` when the client goes away (the body is already read, so the
    next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for h in handles:
                if not h.done:
                    h.cancel()
            return


async def _collect(
    state: ServerState, route: str, request: Request, handles: list[RequestHandle]
) -> list[RequestResult]:
    """Wait for every request to end; cancel them if the client leaves first."""
    items: list[_Item] = []
    watcher = asyncio.create_task(_watch_disconnect(request, handles))
    try:
        await asyncio.gather(
            *(_pump(state, route, i, h, items.append) for i, h in enumerate(handles))
        )
    finally:
        watcher.cancel()
        for h in handles:
            if not h.done:
                h.cancel()
    results: list[RequestResult | None] = [None] * len(handles)
    for i, item in items:
        if isinstance(item, BaseException):
            raise _failure(state, item)
        if isinstance(item, RequestResult):
            if item.finish_reason == "cancelled":
                raise _failure(state, None)
            results[i] = item
    return [r for r in results if r is not None]


async def _stream(
    state: ServerState,
    route: str,
    handles: list[RequestHandle],
    prompts: list[list[int]],
    include_usage: bool,
    make_chunk: Callable[[list[dict[str, Any]]], dict[str, Any]],
    chat: bool,
) -> AsyncIterator[str]:
    queue: asyncio.Queue[_Item] = asyncio.Queue()
    tasks = [
        asyncio.create_task(_pump(state, route, i, h, queue.put_nowait))
        for i, h in enumerate(handles)
    ]
    try:
        if chat:
            yield _sse(make_chunk([
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}
                for i in range(len(handles))
            ]))  # fmt: skip
        first = [True] * len(handles)
        left, completion = len(handles), 0
        while left:
            i, item = await queue.get()
            if isinstance(item, StreamEvent):
                text = _text_of(state, item.tokens, item.text, first[i])
                if not item.tokens and not text:
                    continue
                first[i] = first[i] and not item.tokens
                choice: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": None}
                if chat:
                    choice["delta"] = {"content": text}
                else:
                    choice["text"] = text
                choice["token_ids"] = list(item.tokens)
                yield _sse(make_chunk([choice]))
                continue
            if isinstance(item, RequestResult) and item.finish_reason != "cancelled":
                left -= 1
                completion += len(item.tokens)
                end: dict[str, Any] = {"index": i, "logprobs": None}
                if chat:
                    end["delta"] = {}
                else:
                    end["text"] = ""
                end.update(finish_reason=item.finish_reason, ssd=_ssd_block(item))
                yield _sse(make_chunk([end]))
                continue
            error = _failure(state, item if isinstance(item, BaseException) else None)
            yield _sse(error.body)
            yield "data: [DONE]\n\n"
            return
        if include_usage:
            yield _sse({**make_chunk([]), "usage": _usage(prompts, completion)})
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()


# -- the app ----------------------------------------------------------------------------


class _BearerAuth:
    """Every route but ``/health`` needs ``Authorization: Bearer <api key>``."""

    def __init__(self, app: ASGIApp, api_key: str, on_reject: Callable[[], None]) -> None:
        self.app = app
        self.key = api_key.encode()
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
        if given and secrets.compare_digest(given, self.key):
            await self.app(scope, receive, send)
            return
        self.on_reject()
        error = ApiError(
            401,
            "missing or incorrect API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await error.response()(scope, receive, send)


def create_app(
    engine: Engine,
    target: Model,
    options: ServeOptions | None = None,
    *,
    draft: Model | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over ``engine``.

    Args:
        engine: a running (or not yet started) engine; the app never closes it.
        target: the engine's target model (its tokenizer and chat template are used).
        options: the server's settings (default :class:`ServeOptions`).
        draft: the engine's draft, if any (only its name is shown).

    Returns:
        A FastAPI app; ``app.state.ssd`` is its :class:`ServerState`.
    """
    options = options or ServeOptions()
    state = ServerState(
        engine,
        target,
        options,
        draft_name=None if draft is None else str(getattr(draft, "name", "draft")),
    )
    app = FastAPI(
        title="ssd serve",
        summary="OpenAI-compatible completions on an exact speculative speculative decoding engine",
        docs_url=None,
        redoc_url=None,
    )
    app.state.ssd = state

    def rejected(status: int) -> None:
        state.metrics.rejected.labels(status=str(status)).inc()

    install_error_handlers(app, on_error=rejected)
    if options.api_key:
        app.add_middleware(_BearerAuth, api_key=options.api_key, on_reject=lambda: rejected(401))

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.draining:
            return ApiError(
                503, "the server is shutting down", code="server_shutting_down"
            ).response()
        if state.engine_down:
            return ApiError(503, "the engine has stopped", code="engine_closed").response()
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        cfg = engine.config
        fanout = list(cfg.fanout) if isinstance(cfg.fanout, tuple) else cfg.fanout
        return JSONResponse({
            "object": "list",
            "data": [{
                "id": state.model_name,
                "object": "model",
                "created": state.created,
                "owned_by": "ssd-saguaro",
                "max_model_len": engine.target_context,
                "ssd": {
                    "target": str(getattr(target, "name", "target")), "draft": state.draft_name,
                    "mode": engine.mode, "k": cfg.k, "fanout": fanout, "fallback": cfg.fallback,
                    "driver": engine.driver, "max_batch": engine.capacity,
                    "max_queue": options.max_queue, "has_tokenizer": state.tokenizer is not None,
                },
            }],
        })  # fmt: skip

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompts = _completion_prompts(state, body.prompt)
        handles = _submit(state, prompts, body)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created,
                    "model": state.model_name, "choices": choices}  # fmt: skip

        if body.stream:
            events = _stream(
                state, "completions", handles, prompts, body.include_usage, chunk, chat=False
            )
            return _EventStream(events, handles)
        results = await _collect(state, "completions", request, handles)
        choices = [
            {"index": i, "text": _text_of(state, r.tokens, r.text, True), "logprobs": None,
             "finish_reason": r.finish_reason, "token_ids": list(r.tokens), "ssd": _ssd_block(r)}
            for i, r in enumerate(results)
        ]  # fmt: skip
        return JSONResponse(
            {**chunk(choices), "usage": _usage(prompts, sum(len(r.tokens) for r in results))}
        )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        _check_model(state, body.model)
        prompts = [_chat_prompt(state, body)]
        handles = _submit(state, prompts, body)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": state.model_name, "choices": choices}  # fmt: skip

        if body.stream:
            events = _stream(state, "chat", handles, prompts, body.include_usage, chunk, chat=True)
            return _EventStream(events, handles)
        results = await _collect(state, "chat", request, handles)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": r.text or ""},
             "logprobs": None, "finish_reason": r.finish_reason, "token_ids": list(r.tokens),
             "ssd": _ssd_block(r)}
            for i, r in enumerate(results)
        ]  # fmt: skip
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
            "choices": choices, "usage": _usage(prompts, sum(len(r.tokens) for r in results)),
        })  # fmt: skip

    return app
