"""Prometheus metrics of one `adaptloop serve` process: no per-user labels, counters end in _total."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from serving.adapters import AdapterCache
from serving.engine import Engine

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _StateCollector:
    """The adapter cache's counters and size, and the engine's rows, read at scrape time."""

    def __init__(self, cache: AdapterCache, engine: Engine) -> None:
        self.cache, self.engine = cache, engine

    def collect(self) -> Iterator:
        stats = self.cache.stats
        for name, value, text in (
            ("hits", stats.hits, "requests whose adapter was resident"),
            ("misses", stats.misses, "requests whose adapter had to be loaded"),
            ("loads", stats.loads, "adapters loaded (by requests, preloads and operators)"),
            ("evictions", stats.evictions, "adapters evicted (least recently used, or unloaded)"),
        ):
            yield CounterMetricFamily(f"adaptloop_serve_adapter_{name}", text, value=value)
        yield CounterMetricFamily(
            "adaptloop_serve_adapters_refused", "versions that failed their sha256 check and were not served", value=stats.refused
        )
        yield GaugeMetricFamily("adaptloop_serve_adapters_resident", "adapters loaded now", value=len(self.cache.resident()))
        yield GaugeMetricFamily(
            "adaptloop_serve_requests_running", "requests generating now (rows in the batch)", value=self.engine.running
        )
        yield GaugeMetricFamily(
            "adaptloop_serve_requests_waiting", "requests waiting to join the batch", value=self.engine.waiting
        )

    def describe(self) -> list:
        return []


class ServeMetrics:
    def __init__(self, cache: AdapterCache, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("adaptloop_serve_requests_total", "HTTP requests", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("adaptloop_serve_prompt_tokens_total", "prompt tokens read", registry=r)
        self.generated_tokens = Counter("adaptloop_serve_generated_tokens_total", "tokens generated", registry=r)
        self.first_token = Histogram(
            "adaptloop_serve_time_to_first_token_seconds", "request to first token", buckets=_SECONDS, registry=r
        )
        self.latency = Histogram("adaptloop_serve_request_seconds", "request to last token", buckets=_SECONDS, registry=r)
        self.tokens_per_second = Histogram(
            "adaptloop_serve_tokens_per_second",
            "a request's tokens per second, first to last token",
            registry=r,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
        )
        self.batch_rows = Histogram(
            "adaptloop_serve_batch_rows", "rows in a generation step", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.swaps = Counter(
            "adaptloop_serve_swaps_total", "promotions and rollbacks followed from the lifecycle topic", registry=r
        )
        self.feedback = Counter("adaptloop_serve_feedback_events_total", "feedback events published", ["kind"], registry=r)
        self.registry.register(_StateCollector(cache, engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
