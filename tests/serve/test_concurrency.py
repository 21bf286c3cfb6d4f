"""Many clients at once: 32 concurrent streaming clients with mixed parameters, a client
that disconnects mid-stream, back-pressure, and the drain on shutdown.

Every loop is bounded (a fixed number of requests, each with a timeout) and talks only
to 127.0.0.1. Run under a memory cap: ``ulimit -v 8000000``.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import httpx
import openai
import pytest

from ssd_core import SamplingParams, SSDConfig, generate
from ssd_core.app.serve import RequestDefaults

from .conftest import TARGET_SPEC, open_handles, reference_pair, sse_events

CONFIG = SSDConfig(k=3, fanout=6)
CLIENTS = 32
ROUNDS = 2  # requests per client


def _plan(rng: random.Random, client: int, j: int) -> dict:
    """One request's mixed parameters."""
    req: dict = {
        "model": "reference",
        "prompt": [rng.randrange(64) for _ in range(rng.randint(1, 12))],
        "max_tokens": rng.randint(3, 40),
        "temperature": rng.choice([0.0, 0.7, 1.0, 1.3]),
        "top_p": rng.choice([1.0, 0.9]),
        "n": rng.choice([1, 1, 1, 2]),
    }
    extra = {"top_k": rng.choice([0, 10]), "min_p": rng.choice([0.0, 0.05])}
    if (client + j) % 4:
        req["seed"] = rng.randrange(1 << 32)
    if j % 2:
        req["stream_options"] = {"include_usage": True}
    return {"req": req, "extra": extra}


def _alone(target, draft, mode, plan) -> list[list[int]]:
    req, extra = plan["req"], plan["extra"]
    params = SamplingParams(temperature=req["temperature"], top_p=req["top_p"], **extra)
    return generate(target, draft, prompts=[req["prompt"]] * req["n"], mode=mode, config=CONFIG,
                    sampling=params, max_new_tokens=req["max_tokens"], seed=req["seed"]).tokens  # fmt: skip


@pytest.mark.parametrize("mode", ["sd", "ssd"])
def test_32_concurrent_streaming_clients(serve, mode):
    target, draft = reference_pair(latency_ms=1.0)
    live = serve(target, draft, mode=mode, config=CONFIG, max_batch=8, max_queue=64)
    rng = random.Random(2024)
    plans = [[_plan(rng, c, j) for j in range(ROUNDS)] for c in range(CLIENTS)]
    # What each seeded request gives alone, from generate() on copies of the models that
    # declare the same costs but do not sleep.
    quiet_t, quiet_d = reference_pair(latency_ms=1.0, sleep=False)
    expected = {
        (c, j): _alone(quiet_t, quiet_d, mode, p)
        for c, row in enumerate(plans)
        for j, p in enumerate(row)
        if "seed" in p["req"]
    }

    async def one_client(c: int, api: openai.AsyncOpenAI) -> list:
        out = []
        for j, plan in enumerate(plans[c]):
            stream = await api.completions.create(
                **plan["req"], extra_body=plan["extra"], stream=True
            )
            tokens: dict[int, list[int]] = {}
            texts: dict[int, str] = {}
            finals: dict[int, dict] = {}
            usage = None
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    tokens.setdefault(choice.index, []).extend(
                        choice.model_extra.get("token_ids", [])
                    )
                    texts[choice.index] = texts.get(choice.index, "") + choice.text
                    if choice.finish_reason is not None:
                        assert choice.index not in finals
                        finals[choice.index] = {"reason": choice.finish_reason,
                                                "ssd": choice.model_extra["ssd"]}  # fmt: skip
            out.append((j, tokens, texts, finals, usage))
        return out

    async def main() -> list:
        async with openai.AsyncOpenAI(base_url=live.base_url, api_key="x", max_retries=0,
                                      timeout=120.0) as api:  # fmt: skip
            return await asyncio.wait_for(
                asyncio.gather(*(one_client(c, api) for c in range(CLIENTS))), timeout=300
            )

    results = asyncio.run(main())
    checked = 0
    for c, per_client in enumerate(results):
        assert len(per_client) == ROUNDS
        for j, tokens, texts, finals, usage in per_client:
            req = plans[c][j]["req"]
            n = req["n"]
            assert sorted(finals) == sorted(tokens) == list(range(n)), (c, j)
            for i in range(n):
                # An id-only model has no stop ids: every choice runs to its budget, so
                # any lost or repeated token shows as a wrong count or a wrong text.
                assert len(tokens[i]) == req["max_tokens"]
                assert finals[i]["reason"] == "length"
                assert finals[i]["ssd"]["generated_tokens"] == req["max_tokens"]
                assert texts[i] == " ".join(map(str, tokens[i]))
            if (c, j) in expected:
                assert [tokens[i] for i in range(n)] == expected[(c, j)], (c, j, req)
                checked += 1
            if j % 2:
                assert usage.completion_tokens == n * req["max_tokens"]
                assert usage.prompt_tokens == len(req["prompt"])
    assert checked >= CLIENTS  # most requests were seeded and compared
    live.wait_idle()
    m = live.engine.metrics()
    assert m.generated_tokens == sum(
        p["req"]["n"] * p["req"]["max_tokens"] for row in plans for p in row
    )
    assert m.sequence_rounds > 2 * m.rounds  # the requests really shared rounds


def _first_chunk(lines) -> dict:
    """The next event of a stream (``lines``: one ``iter_lines()`` iterator per response)."""
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[len("data: ") :])
    raise AssertionError("the stream ended before its first event")


def _wait_for(predicate, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.mark.parametrize("mode", ["ar", "sd", "ssd"])
def test_a_client_that_disconnects_mid_stream_frees_its_handles(serve, mode):
    target, draft = reference_pair(latency_ms=5.0)
    live = serve(target, draft, mode=mode)
    long_req = {"model": "reference", "prompt": [1, 2, 3], "max_tokens": 100_000, "stream": True}
    with (
        httpx.Client(base_url=live.url, timeout=30.0) as stay,
        httpx.Client(base_url=live.url, timeout=30.0) as leave,
        stay.stream("POST", "/v1/completions", json=long_req) as kept,
    ):
        kept_lines = kept.iter_lines()
        _first_chunk(kept_lines)
        before = set(live.state.active)
        with leave.stream("POST", "/v1/completions", json=long_req) as dropped:
            dropped_lines = dropped.iter_lines()  # keep it: dropping it disconnects
            _first_chunk(dropped_lines)
            (gone,) = set(live.state.active) - before
            assert target.open_handles == 2  # one target handle per sequence
        leave.close()  # the client goes away mid-stream
        _wait_for(lambda: gone.done, what="the dropped request to end")
        assert gone.result(timeout=0).finish_reason == "cancelled"
        _wait_for(lambda: target.open_handles == 1, what="its target handle to close")
        assert sum(live.state.load()) == 1
        # The other stream is still being served.
        assert _first_chunk(kept_lines)["choices"][0]["finish_reason"] is None
    live.wait_idle()
    assert open_handles(target, draft) == 0


def test_a_non_streaming_client_that_disconnects_frees_its_handles(serve):
    target, draft = reference_pair(latency_ms=5.0)
    live = serve(target, draft)
    body = {"model": "reference", "prompt": [4, 5], "max_tokens": 100_000}
    with (
        httpx.Client(base_url=live.url, timeout=httpx.Timeout(30.0, read=0.5)) as c,
        pytest.raises(httpx.ReadTimeout),
    ):
        c.post("/v1/completions", json=body)
    live.wait_idle(timeout=10)
    assert live.engine.metrics().generated_tokens > 0


def test_back_pressure_answers_429_and_does_not_hang(serve, client):
    target, draft = reference_pair(latency_ms=5.0)
    live = serve(target, draft, max_batch=1, max_queue=1)
    c1, c2, c3 = (httpx.Client(base_url=live.url, timeout=10.0) for _ in range(3))
    long_req = {"model": "reference", "prompt": [1, 2], "max_tokens": 100_000, "stream": True}
    try:
        with c1.stream("POST", "/v1/completions", json=long_req) as running:
            running_lines = running.iter_lines()  # keep it: dropping it disconnects
            _first_chunk(running_lines)
            with c2.stream("POST", "/v1/completions", json=long_req) as waiting:
                assert waiting.status_code == 200
                assert live.state.load() == (1, 1)
                t0 = time.monotonic()
                r = c3.post("/v1/completions", json={**long_req, "stream": False})
                assert time.monotonic() - t0 < 10  # answered, not queued
                assert r.status_code == 429, r.text
                assert r.json()["error"]["code"] == "queue_full"
                assert r.json()["error"]["type"] == "rate_limit_error"
                assert r.headers["retry-after"] == "1"
                r = c3.post("/v1/completions", json={**long_req, "stream": True})
                assert r.status_code == 429
        live.wait_idle()
        r = c3.post("/v1/completions", json={"model": "reference", "prompt": [1], "max_tokens": 3})
        assert r.status_code == 200
        text = c3.get("/metrics").text
        assert 'ssd_requests_rejected_total{status="429"} 2.0' in text
    finally:
        for c in (c1, c2, c3):
            c.close()


def test_shutdown_drains_then_cancels(serve):
    """In-flight requests get the shutdown timeout to finish; what is still running
    after it is cancelled and its client told so; new requests get 503."""
    target, draft = reference_pair(latency_ms=5.0)
    live = serve(target, draft, shutdown_timeout=0.5)
    long_req = {"model": "reference", "prompt": [1, 2], "max_tokens": 100_000, "stream": True}
    with httpx.Client(base_url=live.url, timeout=30.0) as c:
        with c.stream("POST", "/v1/completions", json=long_req) as r:
            lines = r.iter_lines()
            _first_chunk(lines)
            stopper = threading.Thread(target=live.server.stop, kwargs={"timeout": 30})
            stopper.start()
            _wait_for(lambda: live.state.draining, what="the drain")
            with (
                httpx.Client(base_url=live.url, timeout=5.0) as late,
                pytest.raises(httpx.ConnectError),
            ):
                late.get("/health")  # no new connection is accepted
            rest = sse_events(lines)
        stopper.join(30)
    assert not stopper.is_alive()
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["code"] == "server_shutting_down" and error["type"] == "server_error"
    _wait_for(lambda: open_handles(target, draft) == 0, what="handles to close")


def test_a_draining_server_answers_503(serve, client):
    live = serve()
    c = client(live)
    assert c.get("/health").status_code == 200
    live.state.draining = True  # as on a keep-alive connection once the drain began
    for r in (c.get("/health"), c.post("/v1/completions", json={"prompt": [1], "max_tokens": 2})):
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "server_shutting_down"


def test_shutdown_lets_short_requests_finish(serve):
    target, draft = reference_pair(latency_ms=2.0)
    live = serve(target, draft, shutdown_timeout=20.0)
    req = {"model": "reference", "prompt": [1, 2], "max_tokens": 40, "stream": True}
    with httpx.Client(base_url=live.url, timeout=30.0) as c:
        with c.stream("POST", "/v1/completions", json=req) as r:
            lines = r.iter_lines()
            _first_chunk(lines)
            stopper = threading.Thread(target=live.server.stop, kwargs={"timeout": 30})
            stopper.start()
            rest = sse_events(lines)
        stopper.join(30)
    assert rest[-1] == "[DONE]"
    last = json.loads(rest[-2])
    assert last["choices"][0]["finish_reason"] == "length"


def test_seeded_requests_do_not_depend_on_the_batch_default_seed(serve):
    """With --seed S, requests without a seed all use S: identical requests agree."""
    live = serve(defaults=RequestDefaults(seed=5, max_tokens=10))
    with httpx.Client(base_url=live.url, timeout=30.0) as c:
        outs = [
            c.post("/v1/completions", json={"prompt": [3, 1], "temperature": 1.0}).json()
            for _ in range(2)
        ]
    ids = [o["choices"][0]["token_ids"] for o in outs]
    assert ids[0] == ids[1]
    quiet_t, quiet_d = reference_pair(TARGET_SPEC)
    assert ids[0] == generate(quiet_t, quiet_d, prompts=[[3, 1]], config=CONFIG,
                              sampling=SamplingParams(temperature=1.0), max_new_tokens=10,
                              seed=5).tokens[0]  # fmt: skip
