"""When the target fails mid-request: the client is told (a 500, or an error event on a
stream), the engine stops as its error contract says, and the server then answers 503
and reports itself unhealthy instead of hanging."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from .conftest import reference_pair, sse_events


class FailingTarget:
    """A reference target whose ``extend`` raises once ``armed`` is set."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.armed = threading.Event()
        self.name = inner.name
        self.vocab_size = inner.vocab_size
        self.context_size = inner.context_size
        self.tokenizer = None

    def open(self, tokens):
        return self._inner.open(tokens)

    def extend(self, requests):
        if self.armed.is_set():
            raise RuntimeError("the accelerator caught fire")
        return self._inner.extend(requests)

    def fork(self, handle, length):
        return self._inner.fork(handle, length)

    def truncate(self, handle, length):
        self._inner.truncate(handle, length)

    def close(self, handle):
        self._inner.close(handle)

    @property
    def open_handles(self) -> int:
        return self._inner.open_handles


@pytest.mark.parametrize("stream", [False, True])
def test_a_target_failure_is_reported_and_the_server_turns_unhealthy(serve, client, stream):
    inner, draft = reference_pair(latency_ms=2.0)
    target = FailingTarget(inner)
    live = serve(target, draft)
    c = client(live)
    body = {"model": "reference", "prompt": [1, 2], "max_tokens": 100_000, "stream": stream}
    if stream:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            target.armed.set()
            rest = sse_events(lines)
        assert rest[-1] == "[DONE]"
        error = json.loads(rest[-2])["error"]
    else:
        target.armed.set()
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 500
        error = r.json()["error"]
    assert error["code"] == "generation_failed" and error["type"] == "server_error"
    assert "caught fire" in error["message"]
    assert c.get("/health").status_code == 503
    r = c.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_closed"
    deadline = time.monotonic() + 10
    while not live.engine.closed:  # the engine closes itself (its error contract)
        assert time.monotonic() < deadline, "the engine did not close after the failure"
        time.sleep(0.01)
