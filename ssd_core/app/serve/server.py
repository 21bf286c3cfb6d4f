"""Running the app: uvicorn with a graceful drain, and the ``ssd serve`` command.

Shutdown, on SIGINT or SIGTERM (or :meth:`SSDServer.stop`): uvicorn stops accepting
connections; the app answers new requests on open connections with 503 and gives
those in flight ``shutdown_timeout`` seconds to finish, then cancels them (their
clients get an error, their model handles are closed within one round); uvicorn waits
for the responses to end (a backstop a few seconds later cancels what is left). Then
``ssd serve`` closes the engine and frees the models.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI

from ssd_core import Engine, SSDError

from ..common import config_from, free_models, load_models
from .app import ServerState, create_app
from .options import options_from

__all__ = ["SSDServer", "run_serve"]

log = logging.getLogger("ssd_core.app.serve")

#: Seconds uvicorn waits past the drain before it cancels what is still running.
_BACKSTOP_S = 5.0


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling the app to drain when shutdown begins."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._state.begin_drain(self._state.options.shutdown_timeout)
        await super().shutdown(sockets)


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class SSDServer:
    """An app from :func:`create_app`, listening on ``host:port`` (bound at once, so
    ``port=0`` picks a free port that :attr:`port` then tells).

    Args:
        app: the app; its ``app.state.ssd`` drains on shutdown.
        host, port: where to listen.
        log_level: uvicorn's log level.
        access_log: log every request.

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(
        self,
        app: FastAPI,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        access_log: bool = False,
    ) -> None:
        state: ServerState = app.state.ssd
        self.socket = _bind(host, port)
        self.host = host
        self.port: int = self.socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level=log_level,
            access_log=access_log,
            lifespan="off",
            timeout_graceful_shutdown=int(state.options.shutdown_timeout + _BACKSTOP_S + 0.999),
        )
        self._server = _Uvicorn(config, state)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def started(self) -> bool:
        return bool(self._server.started)

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (in the main thread) or :meth:`stop`; returns
        after the drain."""
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def start(self, timeout: float = 30.0) -> None:
        """Serve on a background thread; returns once it accepts connections.

        Raises:
            TimeoutError: it did not start within ``timeout`` seconds.
        """
        self._thread = threading.Thread(target=self.run, name="ssd-serve", daemon=True)
        self._thread.start()
        done = threading.Event()
        for _ in range(int(timeout / 0.01)):
            if self.started or not self._thread.is_alive():
                done.set()
                break
            done.wait(0.01)
        if not self.started:
            raise TimeoutError(f"the server did not start within {timeout} s")

    def stop(self, timeout: float | None = None) -> None:
        """Shut down as on SIGTERM (drain, then stop); waits for a background thread."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)


@contextlib.contextmanager
def _signals_end_the_run() -> Iterator[None]:
    """uvicorn handles SIGINT/SIGTERM while it serves, then restores the previous
    handlers and raises the signal again. Make those handlers no-ops, so the re-raised
    signal ends :meth:`SSDServer.run` rather than the process, and the engine and
    models are released afterwards."""

    def noted(signum: int, _frame: Any) -> None:
        log.info("signal %d: shutting down", signum)

    previous = {sig: signal.signal(sig, noted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_serve(args: argparse.Namespace) -> int:
    """``ssd serve``: load the models, start the engine, serve until a signal.

    Raises:
        SSDError: bad flags, a model that cannot be loaded, or an address that cannot
            be bound (the models are freed first).
    """
    options = options_from(args)
    target, draft = load_models(args, need_draft=args.mode != "ar")
    engine: Engine | None = None
    try:
        engine = Engine(
            target, draft, mode=args.mode, config=config_from(args), driver=args.driver,
            max_batch=args.max_batch,
        )  # fmt: skip
        if engine.config.fallback == "auto" and args.mode == "ssd":
            log.warning(
                "--fallback auto: a seeded request's tokens may depend on the other requests "
                "in flight (use neural or fast to make them reproducible)"
            )
        app = create_app(engine, target, options, draft=draft)
        verbose = logging.getLogger().isEnabledFor(logging.INFO)
        try:
            server = SSDServer(
                app, host=args.host, port=args.port, log_level="info" if verbose else "warning",
                access_log=verbose,
            )  # fmt: skip
        except OSError as exc:
            raise SSDError(f"cannot listen on {args.host}:{args.port}: {exc}") from exc
        state: ServerState = app.state.ssd
        print(
            f"ssd serve: {state.model_name} ({args.mode}, batch {engine.capacity}) on {server.url}",
            file=sys.stderr,
            flush=True,
        )
        with _signals_end_the_run():
            server.run()
        return 0
    finally:
        timeout = options.shutdown_timeout
        if engine is not None:
            engine.close(timeout=timeout)
        if engine is None or engine.closed:
            free_models(target, draft)
        else:
            log.warning(
                "a backend call is still running after %.0f s; not freeing the models", timeout
            )
