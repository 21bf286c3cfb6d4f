"""Load generator for ``ssd serve``: throughput and latency at several concurrency levels.

Either point it at a running server (``--url``), or let it start ``ssd serve`` itself
once per mode (``--modes ar,sd,ssd``; everything after ``--`` goes to ``ssd serve``)
on a free loopback port, and stop it with SIGTERM afterwards. Every run is bounded: a
fixed number of requests per level, each with a timeout.

Prompts are the bundled set (``ssd_core.app.default_prompts``): chat prompts go to
``/v1/chat/completions``, the rest to ``/v1/completions`` (``--ids`` sends token-id
prompts to ``/v1/completions`` instead, for id-only models). Each request streams, so
the client sees the first token and each delivery.

Example (the figures in docs/serving.md)::

    python scripts/serve_load.py --modes ar,sd,ssd --concurrency 1,4,16 --requests 16 \\
        --max-tokens 64 --temperature 0 -- --backend llama_cpp --threads 1

Per level it prints: requests, generated tokens, wall seconds, tokens/s (all clients),
requests/s, time to first token (p50, p90), request latency (p50, p90), inter-delivery
gap p50, mean time per output token, and the engine's acceptance, tokens per target
pass and cache hit rate over the level (from ``/metrics`` before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import httpx

from ssd_core.app import default_prompts


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _scrape(client: httpx.Client) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _requests(args: argparse.Namespace, n: int) -> list[tuple[str, dict[str, Any]]]:
    prompts = default_prompts()
    out = []
    for i, p in zip(range(n), itertools.cycle(prompts)):
        body: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature,
                                "stream": True, "seed": args.seed + i}  # fmt: skip
        if args.ids:
            body["prompt"] = [1 + (i * 7 + j) % 50 for j in range(8)]
            out.append(("/v1/completions", body))
        elif p["chat"] and not args.no_chat:
            body["messages"] = [{"role": "user", "content": p["text"]}]
            out.append(("/v1/chat/completions", body))
        else:
            body["prompt"] = p["text"]
            out.append(("/v1/completions", body))
    return out


async def _one(client: httpx.AsyncClient, route: str, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = None
    last = None
    gaps: list[float] = []
    tokens = 0
    async with client.stream("POST", route, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk["choices"]:
                n = len(choice.get("token_ids", []))
                if n:
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)  # type: ignore[operator]
                    last = now
                    tokens += n
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "latency": end - t0, "tokens": tokens, "gaps": gaps,
            "tpot": (end - first) / (tokens - 1) if first is not None and tokens > 1 else None}  # fmt: skip


async def _level(url: str, key: str | None, reqs: list, concurrency: int, timeout: float) -> tuple:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, timeout=timeout, headers=headers, limits=limits
    ) as c:
        todo = iter(reqs)
        results: list[dict[str, Any]] = []

        async def worker() -> None:
            for route, body in todo:
                results.append(await _one(c, route, body))

        t0 = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(*(worker() for _ in range(concurrency))), timeout * len(reqs)
        )
        return results, time.perf_counter() - t0


def measure(url: str, args: argparse.Namespace, label: str) -> list[dict[str, Any]]:
    rows = []
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=url, timeout=30.0, headers=headers) as sync:
        if args.warmup:
            asyncio.run(_level(url, args.api_key, _requests(args, 1), 1, args.timeout))
        for conc in args.concurrency:
            before = _scrape(sync)
            load0 = os.getloadavg()
            results, wall = asyncio.run(
                _level(
                    url, args.api_key, _requests(args, max(args.requests, conc)), conc, args.timeout
                )
            )
            after = _scrape(sync)
            d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
            acc, rej = (
                d.get("ssd_draft_tokens_accepted_total", 0),
                d.get("ssd_draft_rejections_total", 0),
            )
            tokens = sum(r["tokens"] for r in results)
            row = {
                "mode": label, "concurrency": conc, "requests": len(results), "tokens": tokens,
                "wall_s": wall, "tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall,
                "ttft_p50_s": _pct([r["ttft"] for r in results], 0.5),
                "ttft_p90_s": _pct([r["ttft"] for r in results], 0.9),
                "latency_p50_s": _pct([r["latency"] for r in results], 0.5),
                "latency_p90_s": _pct([r["latency"] for r in results], 0.9),
                "gap_p50_s": _pct([g for r in results for g in r["gaps"]], 0.5),
                "tpot_mean_s": statistics.fmean([r["tpot"] for r in results if r["tpot"] is not None] or [float("nan")]),
                "acceptance_per_token": acc / (acc + rej) if acc + rej else None,
                "tokens_per_target_pass": d.get("ssd_generated_tokens_total", 0) / d["ssd_sequence_rounds_total"]
                if d.get("ssd_sequence_rounds_total") else None,
                "cache_hit_rate": d.get("ssd_cache_hits_total", 0) / d["ssd_cache_lookups_total"]
                if d.get("ssd_cache_lookups_total") else None,
                "loadavg_before": load0[0], "loadavg_after": os.getloadavg()[0],
            }  # fmt: skip
            rows.append(row)
            print(_fmt(row), flush=True)
    return rows


def _fmt(r: dict[str, Any]) -> str:
    def f(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    return (
        f"{r['mode']:>4} c={r['concurrency']:<3} req={r['requests']:<3} tok={r['tokens']:<5} "
        f"wall={r['wall_s']:6.1f}s {r['tokens_per_s']:6.1f} tok/s {r['requests_per_s']:5.2f} req/s "
        f"ttft p50/p90={r['ttft_p50_s']:.2f}/{r['ttft_p90_s']:.2f}s "
        f"lat p50/p90={r['latency_p50_s']:.2f}/{r['latency_p90_s']:.2f}s "
        f"gap p50={r['gap_p50_s'] * 1e3:.0f}ms tpot={r['tpot_mean_s'] * 1e3:.0f}ms "
        f"acc={f(r['acceptance_per_token'], '.2f')} tok/pass={f(r['tokens_per_target_pass'], '.2f')} "
        f"hit={f(r['cache_hit_rate'], '.2f')} load={r['loadavg_before']:.2f}->{r['loadavg_after']:.2f}"
    )


class _Server:
    """``ssd serve`` in a subprocess on a free loopback port."""

    def __init__(self, mode: str, serve_args: list[str]) -> None:
        cmd = [sys.executable, "-m", "ssd_core.app.cli", "serve", "--mode", mode, "--port", "0",
               "--host", "127.0.0.1", *serve_args]  # fmt: skip
        print("$", " ".join(cmd), flush=True)
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.url: str | None = None
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
                if m and self.url is None:
                    self.url = m.group(1)
                    ready.set()
                elif self.url is None or "Traceback" in line or "error" in line.lower():
                    sys.stderr.write(line)
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(300)
        if self.url is None:
            self.proc.kill()
            raise SystemExit(f"ssd serve --mode {mode} did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, serve_args = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help="a running server (default: start ssd serve per mode)")
    p.add_argument("--modes", default="ar,sd,ssd", help="modes to start (without --url)")
    p.add_argument("--concurrency", default="1,4,16", help="comma list of concurrent clients")
    p.add_argument(
        "--requests", type=int, default=16, help="requests per level (at least the concurrency)"
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="request i gets seed + i")
    p.add_argument("--ids", action="store_true", help="token-id prompts (id-only models)")
    p.add_argument("--no-chat", action="store_true", help="send chat prompts as plain text")
    p.add_argument("--api-key")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    print(f"loadavg at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    rows: list[dict[str, Any]] = []
    if args.url:
        rows += measure(args.url.rstrip("/"), args, "url")
    else:
        for mode in args.modes.split(","):
            server = _Server(mode, serve_args)
            try:
                assert server.url is not None
                rows += measure(server.url, args, mode)
            finally:
                server.stop()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"argv": sys.argv, "serve_args": serve_args, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
