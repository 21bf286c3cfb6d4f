"""A live ``ssd serve`` app on a free loopback port, in-process, for the serve tests.

The folder skips when the ``serve`` extra (FastAPI, uvicorn, prometheus-client) or the
test clients (``openai``, ``httpx``) are missing. Every server listens on 127.0.0.1
only; every client loop in these tests is bounded in count and time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

for _module in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai"):
    pytest.importorskip(_module)

import httpx  # noqa: E402

from ssd_core import Engine, Model, SSDConfig  # noqa: E402
from ssd_core.app import load_backend  # noqa: E402
from ssd_core.app.serve import RequestDefaults, ServeOptions  # noqa: E402
from ssd_core.app.serve.app import ServerState, create_app  # noqa: E402
from ssd_core.app.serve.server import SSDServer  # noqa: E402

TARGET_SPEC = "vocab=64,order=2,seed=1"


def reference_pair(
    spec: str = TARGET_SPEC, *, latency_ms: float = 0.0, divergence: float = 0.5, sleep: bool = True
) -> tuple[Model, Model]:
    """A reference target and its perturbed draft (``latency_ms`` sleeps per call, unless
    ``sleep`` is false: the same declared costs -- which the engine's speculation
    policy plans with, so they shape the tokens -- without the wait)."""
    backend = load_backend("reference")
    slow = f",latency_ms={latency_ms}" if latency_ms else ""
    if latency_ms and not sleep:
        slow += ",sleep=0"
    target = backend.load(spec + slow, {"role": "target"})
    draft = backend.load(
        f"divergence={divergence}{slow}",
        {"role": "draft", "target_args": spec, "vocab_size": target.vocab_size},
    )
    return target, draft


class Live:
    """A running server: its URL, app state, engine and models."""

    def __init__(self, server: SSDServer, state: ServerState, target: Model, draft: Model | None):
        self.server = server
        self.state = state
        self.engine = state.engine
        self.target = target
        self.draft = draft
        self.url = server.url
        self.base_url = server.url + "/v1"

    def wait_idle(self, timeout: float = 20.0) -> None:
        """Wait until no request is in flight and the models hold no handle."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(self.state.load()) == 0 and open_handles(self.target, self.draft) == 0:
                return
            time.sleep(0.02)
        raise AssertionError(
            f"still busy after {timeout} s: load {self.state.load()}, "
            f"{open_handles(self.target, self.draft)} model handles open"
        )


def open_handles(*models: Model | None) -> int:
    return sum(int(getattr(m, "open_handles", 0)) for m in models if m is not None)


@pytest.fixture
def serve() -> Iterator[Callable[..., Live]]:
    """Start servers; each is stopped, its engine closed and handles checked after."""
    started: list[tuple[Live, bool]] = []

    def start(
        target: Model | None = None,
        draft: Model | None = None,
        *,
        mode: str = "ssd",
        config: SSDConfig | None = None,
        max_batch: int | None = 8,
        own_models: bool = True,
        **option_kw: Any,
    ) -> Live:
        if target is None:
            target, draft = reference_pair()
        defaults = option_kw.pop("defaults", RequestDefaults(max_tokens=32))
        options = ServeOptions(defaults=defaults, **option_kw)
        engine = Engine(
            target, draft if mode != "ar" else None, mode=mode,
            config=config or SSDConfig(k=3, fanout=6), max_batch=max_batch,
        )  # fmt: skip
        app = create_app(engine, target, options, draft=draft)
        server = SSDServer(app, host="127.0.0.1", port=0)
        server.start()
        live = Live(server, app.state.ssd, target, draft)
        started.append((live, own_models))
        return live

    yield start
    for live, _ in started:
        live.server.stop(timeout=30)
        live.engine.close(timeout=30)
        assert live.engine.closed
    for live, own in started:
        assert open_handles(live.target, live.draft) == 0
        if own:
            for m in (live.target, live.draft):
                free = getattr(m, "free", None)
                if free is not None and not getattr(m, "freed", False):
                    free()


@pytest.fixture
def client() -> Iterator[Callable[[Live], httpx.Client]]:
    clients: list[httpx.Client] = []

    def make(live: Live, **kw: Any) -> httpx.Client:
        c = httpx.Client(base_url=live.url, timeout=30.0, **kw)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


def sse_events(lines: Iterator[str]) -> list[str]:
    """The ``data:`` payloads of a server-sent-event stream, in order."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            out.append(line[len("data: ") :])
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return out
