"""``GET /metrics``: the server's and the engine's figures in the Prometheus text format.

Two sources. The engine's own counts (tokens, rounds, draft tokens proposed and
accepted, cache lookups and hits, busy seconds per lane) are read from
:meth:`ssd_core.Engine.metrics` at each scrape by a custom collector, so they are never
double-counted or stale. What only the server sees -- requests running and waiting,
prompt tokens, finish reasons, rejected requests, and the latency a client feels
(time to first token, inter-token latency) -- is counted by prometheus-client's own
metric types as requests come and go.

Every series lives in a registry of its own (one per app), so several servers in one
process (the tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ssd_core import Engine, Metrics, RequestResult

__all__ = ["ServerMetrics"]

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _EngineCollector(Collector):
    """Reads :meth:`Engine.metrics` at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        m: Metrics = self._engine.metrics()

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield counter("ssd_generated_tokens", "Tokens committed by the engine.", m.generated_tokens)
        yield counter("ssd_rounds", "Batched verification passes of the target.", m.rounds)
        yield counter(
            "ssd_sequence_rounds",
            "One sequence's share of a verification pass, summed over sequences.",
            m.sequence_rounds,
        )
        yield counter(
            "ssd_draft_tokens_proposed", "Draft tokens sent to verification.", m.proposed_tokens
        )
        yield counter(
            "ssd_draft_tokens_accepted", "Draft tokens the target accepted.", m.accepted_tokens
        )
        yield counter(
            "ssd_draft_rejections", "Verification rounds that ended at a rejection.", m.rejections
        )
        yield counter("ssd_cache_lookups", "SSD speculation-cache lookups.", m.cache_lookups)
        yield counter("ssd_cache_hits", "SSD speculation-cache hits.", m.cache_hits)
        yield counter(
            "ssd_draft_faults", "Draft-lane failures survived by degrading.", m.draft_faults
        )
        fallbacks = CounterMetricFamily(
            "ssd_fallbacks", "Speculations that came from a fallback, by kind.", labels=["kind"]
        )
        for kind, n in sorted(m.fallbacks.items()):
            fallbacks.add_metric([kind], n)
        yield fallbacks
        busy = CounterMetricFamily(
            "ssd_lane_busy_seconds", "Seconds each lane spent in backend calls.", labels=["lane"]
        )
        busy.add_metric(["target"], m.target_busy_s)
        busy.add_metric(["draft"], m.draft_busy_s)
        yield busy
        passes = CounterMetricFamily(
            "ssd_lane_passes", "Backend passes (batched calls) per lane.", labels=["lane"]
        )
        passes.add_metric(["target"], m.target_passes)
        passes.add_metric(["draft"], m.draft_passes)
        yield passes
        yield gauge(
            "ssd_engine_wall_seconds",
            "Seconds the engine has been running work (busy / wall = lane utilisation).",
            m.wall_s,
        )
        yield gauge(
            "ssd_acceptance_per_token",
            "Per-token acceptance alpha = accepted / (accepted + rejections), engine lifetime.",
            m.acceptance_per_token,
        )
        yield gauge(
            "ssd_accepted_per_proposed",
            "Accepted / proposed draft tokens, engine lifetime.",
            m.accepted_per_proposed,
        )
        yield gauge(
            "ssd_cache_hit_rate", "SSD cache hits / lookups, engine lifetime.", m.cache_hit_rate
        )
        yield gauge(
            "ssd_tokens_per_target_pass",
            "Tokens committed per sequence per target pass (1.0 for AR), engine lifetime.",
            m.tokens_per_target_pass,
        )


class ServerMetrics:
    """The metrics of one server.

    Args:
        engine: the engine whose counts are exported.
        load: returns (requests running, requests waiting) at scrape time.
        labels: constant facts shown in ``ssd_server_info`` (model, mode, ...).
    """

    def __init__(
        self, engine: Engine, load: Callable[[], tuple[int, int]], labels: dict[str, str]
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        reg.register(_EngineCollector(engine))
        info = Gauge(
            "ssd_server_info", "The served model and engine settings.", list(labels), registry=reg
        )
        info.labels(**labels).set(1)
        running = Gauge("ssd_requests_running", "Requests generating now.", registry=reg)
        running.set_function(lambda: float(load()[0]))
        waiting = Gauge(
            "ssd_requests_waiting",
            "Requests admitted by the server, waiting for a batch slot.",
            registry=reg,
        )
        waiting.set_function(lambda: float(load()[1]))
        self.requests = Counter(
            "ssd_requests",
            "Requests that ran, by route and finish reason.",
            ["route", "finish_reason"],
            registry=reg,
        )
        self.rejected = Counter(
            "ssd_requests_rejected",
            "Requests answered with an error before generating, by HTTP status.",
            ["status"],
            registry=reg,
        )
        self.prompt_tokens = Counter(
            "ssd_prompt_tokens", "Prompt tokens of requests that ran.", registry=reg
        )
        self.completion_tokens = Counter(
            "ssd_completion_tokens", "Tokens returned to clients.", registry=reg
        )
        self.ttft = Histogram(
            "ssd_time_to_first_token_seconds",
            "Seconds from submission to a request's first token (queueing included).",
            buckets=_TTFT_BUCKETS,
            registry=reg,
        )
        self.itl = Histogram(
            "ssd_inter_token_latency_seconds",
            "Seconds between two deliveries of tokens to one request (a delivery carries "
            "every token one round committed).",
            buckets=_ITL_BUCKETS,
            registry=reg,
        )
        self.tpot = Histogram(
            "ssd_time_per_output_token_seconds",
            "Per request: (end - first token) / (tokens - 1).",
            buckets=_ITL_BUCKETS,
            registry=reg,
        )
        self.e2e = Histogram(
            "ssd_request_duration_seconds",
            "Seconds from submission to a request's end.",
            buckets=_E2E_BUCKETS,
            registry=reg,
        )

    def finished(self, route: str, result: RequestResult) -> None:
        """Count a request that ended (any reason)."""
        self.requests.labels(route=route, finish_reason=str(result.finish_reason)).inc()
        self.completion_tokens.inc(len(result.tokens))
        if result.first_token_s is not None:
            self.ttft.observe(result.first_token_s)
            if result.total_s is not None and len(result.tokens) > 1:
                self.tpot.observe(
                    (result.total_s - result.first_token_s) / (len(result.tokens) - 1)
                )
        if result.total_s is not None:
            self.e2e.observe(result.total_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
