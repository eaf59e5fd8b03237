"""Prometheus metrics of the worker: no per-user labels, counters end in _total."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS = Counter("adaptloop_worker_events_consumed_total", "Input messages consumed", ["topic"], registry=REGISTRY)
DEAD_LETTERS = Counter("adaptloop_worker_dead_letters_total", "Messages sent to the DLQ", ["topic"], registry=REGISTRY)
PROCESSED = Counter("adaptloop_worker_events_processed_total", "Valid events applied to user state", registry=REGISTRY)
REROUTED = Counter("adaptloop_worker_rerouted_events_total", "Events moved to their user's home partition", registry=REGISTRY)
DUPLICATES = Counter("adaptloop_worker_duplicate_events_total", "Events already counted (by event_id)", registry=REGISTRY)
REREADS = Counter(
    "adaptloop_worker_fetch_rereads_total",
    "Fetched records a rebalance cut off, re-read from the committed offset",
    registry=REGISTRY,
)
EXAMPLES = Counter("adaptloop_worker_examples_total", "Training examples curated", ["source"], registry=REGISTRY)
NOT_TRAINED = Counter(
    "adaptloop_worker_not_trained_events_total", "Events counted but not trained on (consent)", registry=REGISTRY
)
FORGOTTEN = Counter(
    "adaptloop_worker_forgotten_envelopes_total",
    "Events, commands and lifecycle events of forgotten users, from before their forget (ignored)",
    registry=REGISTRY,
)
REDACTED = Counter(
    "adaptloop_worker_redactions_total", "Personal data items replaced by placeholders", ["type"], registry=REGISTRY
)
REQUESTS = Counter("adaptloop_worker_training_requests_total", "Training requests emitted", ["trigger"], registry=REGISTRY)
REVIEW_REQUESTS = Counter(
    "adaptloop_worker_review_requests_total",
    "Labelling tasks on adapter.review-requests, by status: open (emitted), answered, expired",
    ["status"],
    registry=REGISTRY,
)
BATCH_SECONDS = Histogram(
    "adaptloop_worker_batch_seconds",
    "Time to process one batch",
    ["stage"],
    registry=REGISTRY,
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)


_lag: list = []


def watch_lag(client, group: str, topics: list[str]) -> None:
    """Report the consumer lag of the worker's group (once per process)."""
    from core.kafka.lag import ConsumerLagCollector

    if not _lag:
        _lag.append(ConsumerLagCollector(client, {group: topics}))
        REGISTRY.register(_lag[0])


def render() -> bytes:
    return generate_latest(REGISTRY)
