"""Prometheus metrics, one registry per app (so several apps in a process, as in tests, never clash).

HTTP counts and durations are taken around the whole ASGI app, so 404s and auth failures count too.
Engine counters and gauges are read from the engine when scraped; the latency samples the engine
thread collects (time to first token, inter-token) are drained into histograms at each scrape and at
the end of each request, so they never pile up unscraped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from jaxrs.engine.async_engine import AsyncEngine
from jaxrs.engine.engine import Engine

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


def _drain(samples: list[float]) -> list[float]:
    """Take the samples present now; the engine thread may append meanwhile (only at the end)."""
    n = len(samples)
    taken = samples[:n]
    del samples[:n]
    return taken


class _EngineCollector:
    """Reads the engine's counters and gauges at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        engine, driver = self.metrics.engine, self.metrics.driver
        if engine is None:
            return
        stats = driver.stats if driver is not None else None
        tokens = CounterMetricFamily("tokens_processed", "Tokens processed", labels=["kind"])
        tokens.add_metric(["prompt"], stats.prompt_tokens if stats else 0)
        tokens.add_metric(["generation"], stats.generation_tokens if stats else 0)
        yield tokens
        completed = CounterMetricFamily(
            "sequences_completed", "Sequences finished, by finish reason", labels=["reason"]
        )
        for reason, count in sorted(dict(stats.finished if stats else {}).items()):
            completed.add_metric([reason], count)
        yield completed
        done = stats.requantizations if stats else 0
        yield CounterMetricFamily("re_isq", "Weight re-quantizations done (POST /v1/re_isq)", value=done)
        now = engine.stats()
        yield CounterMetricFamily(
            "prefix_cache_lookups",
            "Prompt tokens looked up in the prefix cache",
            value=now.prefix_cache_lookups,
        )
        yield CounterMetricFamily(
            "prefix_cache_hits", "Prompt tokens found in the prefix cache", value=now.prefix_cache_hits
        )
        yield CounterMetricFamily(
            "prefix_cache_evictions",
            "Cached KV blocks reclaimed for new content",
            value=now.prefix_cache_evictions,
        )
        yield CounterMetricFamily(
            "paged_preemptions", "Sequences preempted for lack of KV blocks", value=now.num_preemptions
        )
        yield from _spec_decode_metrics(now.spec_decode)
        running = driver.num_running if driver else now.num_running
        waiting = driver.num_waiting if driver else now.num_waiting
        yield GaugeMetricFamily("sequences_running", "Sequences being generated", value=running)
        yield GaugeMetricFamily("sequences_waiting", "Sequences waiting to start", value=waiting)
        yield GaugeMetricFamily("kv_cache_blocks_used", "KV blocks in use", value=now.kv_blocks_used)
        yield GaugeMetricFamily("kv_cache_blocks_total", "KV blocks in the pool", value=now.kv_blocks_total)
        compiled = now.compiled_shapes
        yield GaugeMetricFamily("step_shapes_compiled", "Model step shapes compiled", value=compiled)
        yield GaugeMetricFamily(
            "step_shapes_pending", "Step shapes the warm-up has yet to compile", value=now.pending_shapes
        )


def _spec_decode_metrics(spec) -> Iterator[Metric]:
    """vLLM's speculative decoding counters (none when speculation is off)."""
    if spec is None:
        return
    for name, doc, value in (
        ("spec_decode_num_drafts", "Rows verified with draft tokens", spec.num_drafts),
        ("spec_decode_num_draft_tokens", "Draft tokens proposed", spec.num_draft_tokens),
        ("spec_decode_num_accepted_tokens", "Draft tokens accepted", spec.num_accepted_tokens),
    ):
        yield CounterMetricFamily(name, doc, value=value)
    per_pos = CounterMetricFamily(
        "spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted, by position", labels=["position"]
    )
    for position, count in enumerate(spec.accepted_per_position):
        per_pos.add_metric([str(position)], count)
    yield per_pos


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.engine: Engine | None = None
        self.driver: AsyncEngine | None = None
        self.http_requests = Counter(
            "http_requests",
            "HTTP requests, by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "http_request_duration_seconds",
            "HTTP request duration, to the end of the response body",
            ["method", "route"],
            buckets=_HTTP_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "time_to_first_token_seconds",
            "Time from a sequence's arrival to its first generated token",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "inter_token_latency_seconds",
            "Time between a sequence's generated tokens",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(self))

    def attach(self, engine: Engine, driver: AsyncEngine | None) -> None:
        self.engine, self.driver = engine, driver

    def drain_latencies(self) -> None:
        if self.driver is None:
            return
        for value in _drain(self.driver.stats.time_to_first_token):
            self.ttft.observe(value)
        for value in _drain(self.driver.stats.inter_token):
            self.itl.observe(value)

    def render(self) -> bytes:
        self.drain_latencies()
        return generate_latest(self.registry)

    def instrument(self, app: ASGIApp) -> ASGIApp:
        """Wrap an ASGI app to count and time every HTTP request by its route template."""

        async def timed(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            start = time.perf_counter()
            status, counted = 500, False

            def count() -> None:
                nonlocal counted
                counted = True
                route = scope.get("path_template") or "unmatched"
                self.http_requests.labels(scope["method"], route, str(status)).inc()
                self.http_duration.labels(scope["method"], route).observe(time.perf_counter() - start)

            async def send_and_count(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                elif message["type"] == "http.response.body" and not message.get("more_body"):
                    count()  # before the last byte goes out, so a client that saw it sees the count
                await send(message)

            try:
                await app(scope, receive, send_and_count)
            finally:
                if not counted:  # the client left mid-response, or no response was sent
                    count()

        return timed
