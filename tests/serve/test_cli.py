"""``ssd serve`` as a user runs it: a subprocess on a free loopback port, stopped with
SIGTERM or SIGINT mid-request (graceful: the stream is told, the process exits 0)."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from ssd_core import SamplingParams, SSDConfig, generate
from ssd_core.app.cli import build_parser

from .conftest import reference_pair

MEMORY_CAP = 4 << 30  # bytes of address space for the server process


def test_serve_flags_and_their_defaults():
    args = build_parser().parse_args(["serve", "--backend", "reference"])
    assert (args.host, args.port, args.max_batch, args.max_queue) == ("127.0.0.1", 8000, 16, 64)
    # OpenAI's default temperature; a fallback that keeps seeded requests reproducible;
    # no fixed seed (a request without one gets a fresh one).
    assert (args.temperature, args.fallback, args.seed) == (1.0, "neural", None)
    assert args.api_key is None and args.served_model_name is None
    gen = build_parser().parse_args(["generate", "--backend", "reference"])
    assert (gen.temperature, gen.fallback, gen.seed) == (0.0, "neural", 0)  # generate unchanged


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


class _Proc:
    def __init__(self, *flags: str) -> None:
        cmd = [sys.executable, "-m", "ssd_core.app.cli", "serve", "--port", "0", *flags]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=_cap_memory, env={**os.environ, "SSD_API_KEY": ""},
        )  # fmt: skip
        self.err: list[str] = []
        self.url: str | None = None
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.err.append(line)
                m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
                if m and self.url is None:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(60)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def spawn() -> Iterator:
    procs: list[_Proc] = []

    def start(*flags: str) -> _Proc:
        p = _Proc(*flags)
        procs.append(p)
        assert p.url is not None, "".join(p.err)
        return p

    yield start
    for p in procs:
        p.kill()


REFERENCE = ("--backend", "reference", "--target", "reference:vocab=64,order=2,seed=1,latency_ms=5",
             "--draft", "reference:divergence=0.5")  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_drains_and_exits_cleanly(spawn, sig):
    p = spawn(*REFERENCE, "--shutdown-timeout", "1")
    long_req = {"prompt": [1, 2], "max_tokens": 100_000, "stream": True}
    with httpx.Client(base_url=p.url, timeout=30.0) as c:
        seeded = c.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 10, "seed": 3})
        assert seeded.status_code == 200
        with c.stream("POST", "/v1/completions", json=long_req) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            t0 = time.monotonic()
            p.proc.send_signal(sig)
            payloads = [line[6:] for line in lines if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["error"]["code"] == "server_shutting_down"
    assert p.wait(60) == 0, "".join(p.err)
    assert time.monotonic() - t0 < 30
    assert "Traceback" not in "".join(p.err)
    # The command's flags reach the engine: the seeded answer is generate()'s with the
    # same settings (K=4, fan-out 12, neural fallback, temperature 1).
    target, draft = reference_pair()
    ref = generate(target, draft, prompts=[[1, 2, 3]], config=SSDConfig(k=4, fanout=12),
                   sampling=SamplingParams(temperature=1.0), max_new_tokens=10, seed=3)  # fmt: skip
    assert seeded.json()["choices"][0]["token_ids"] == ref.tokens[0]


def test_api_key_from_the_command_line(spawn):
    p = spawn("--backend", "reference", "--api-key", "k1", "--served-model-name", "ref")
    with httpx.Client(base_url=p.url, timeout=30.0) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/v1/models").status_code == 401
        r = c.get("/v1/models", headers={"Authorization": "Bearer k1"})
        assert r.json()["data"][0]["id"] == "ref"
    p.proc.send_signal(signal.SIGTERM)
    assert p.wait(60) == 0


def test_a_busy_port_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "ssd_core.app.cli", "serve", "--backend", "reference",
             "--port", str(port)],
            capture_output=True, text=True, timeout=60, preexec_fn=_cap_memory,
        )  # fmt: skip
    assert out.returncode == 2
    assert "cannot listen on 127.0.0.1:" in out.stderr and "Traceback" not in out.stderr


def test_a_seeded_request_equals_ssd_generate_with_the_same_flags(serve, client, capsys):
    from ssd_core.app.cli import main

    flags = ["--backend", "reference", "--temperature", "1", "--fallback", "neural", "--seed",
             "3", "--max-new-tokens", "10", "--k", "4", "--fanout", "12"]  # fmt: skip
    assert main(["generate", *flags, "--json", "1 2 3"]) == 0
    expected = json.loads(capsys.readouterr().out)["tokens"]
    live = serve(config=SSDConfig(k=4, fanout=12))
    r = client(live).post(
        "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 10, "seed": 3}
    )
    assert r.json()["choices"][0]["token_ids"] == expected
