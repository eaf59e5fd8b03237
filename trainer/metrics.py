"""Prometheus metrics of a trainer: no per-user labels, counters end in _total.

Served on http://<training.metrics_host>:<training.metrics_port>/metrics
(`adaptloop trainer --metrics-port P`; 0 turns it off), together with the
consumer lag of the trainers' group (adaptloop/kafka/lag.py).
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("adaptloop.trainer")

REGISTRY = CollectorRegistry(auto_describe=True)

LIFECYCLE = Counter(
    "adaptloop_trainer_lifecycle_events_total", "Lifecycle events published, by type", ["type"], registry=REGISTRY
)
TRAIN_SECONDS = Histogram(
    "adaptloop_trainer_train_seconds",
    "Training time of a version",
    registry=REGISTRY,
    buckets=(5, 15, 30, 60, 120, 300, 600, 1800, 3600),
)
TOKENS = Counter("adaptloop_trainer_trained_tokens_total", "Tokens trained on (answer and prompt tokens)", registry=REGISTRY)
BUSY = Gauge("adaptloop_trainer_busy", "1 while a job (training or validation) runs", registry=REGISTRY)


def serve(port: int, host: str, collectors=()) -> bool:
    """Start the metrics endpoint in a background thread; False (logged) when the port is taken."""
    for collector in collectors:
        REGISTRY.register(collector)
    if port <= 0:
        return False
    try:
        start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        log.error("metrics endpoint %s:%d not started (%s); the trainer runs without it", host, port, exc)
        return False
    log.info("metrics on http://%s:%d/metrics", host, port)
    return True
