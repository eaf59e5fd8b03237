"""Prometheus metrics of one API process: no per-user labels, counters end in _total."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from api.config import ApiConfig
from core.kafka.lag import ConsumerLagCollector


class ApiMetrics:
    def __init__(self, cfg: ApiConfig) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("adaptloop_api_requests_total", "HTTP requests", ["route", "status"], registry=self.registry)
        self.commands = Counter("adaptloop_api_commands_total", "commands published", ["type"], registry=self.registry)
        self.jobs = Gauge("adaptloop_api_jobs", "jobs known to this API process, by status", ["status"], registry=self.registry)
        if cfg.lag_groups:
            self.registry.register(ConsumerLagCollector(cfg.client, {group: list(topics) for group, topics in cfg.lag_groups}))

    def render(self, job_counts: dict[str, int]) -> bytes:
        for status, count in job_counts.items():
            self.jobs.labels(status).set(count)
        return generate_latest(self.registry)
