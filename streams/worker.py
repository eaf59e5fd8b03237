"""`adaptloop worker`: run the streams side (a faust-streaming app, aiokafka driver).

    adaptloop worker [--web-port P] [--config PATH]

Start as many as you like with the same `streams.app_id`: they form one
consumer group and share the partitions; each user is handled by one of them.
Prometheus metrics are served on http://<streams.web_bind>:<web_port>/metrics.
"""

from __future__ import annotations

import gc

from core.kafka.topics import TopicPlan, ensure_topics, plans_from_specs
from core.settings import Settings
from streams.config import WorkerConfig


def gc_thresholds(batch_size: int) -> tuple[int, int, int]:
    """The collector's thresholds for a worker that handles `batch_size` messages at once (Python's: 700, 10, 10).

    The tables hold millions of small objects that live as long as the worker:
    at Python's default thresholds its collector walked them so often that a
    batch took ~1.4x as long once 100,000 events were held. A batch also makes
    ~25-40 short-lived containers per message (records, envelopes, examples,
    their dicts): with the youngest generation's threshold below that, every
    batch set off a collection or two of ~15 ms midway (~6% of the handler's
    time), where above it they are freed before one comes. Capped, so that a
    huge batch size does not leave cyclic garbage waiting without bound.
    """
    return min(max(50_000, 64 * batch_size), 2_000_000), 20, 100


def run_worker(settings: Settings, web_port: int | None = None, loglevel: str = "warning") -> None:
    """Ensure the topics, then run the worker until SIGTERM/SIGINT."""
    import faust

    from streams.app import create_app

    cfg = WorkerConfig.from_settings(settings, web_port)
    internal = TopicPlan(cfg.internal_topic, cfg.internal_partitions)
    ensure_topics(cfg.client, [*plans_from_specs(settings.topics.all()), internal])
    worker = faust.Worker(create_app(cfg), loglevel=loglevel.upper(), quiet=True)
    # Faust's start-up spinner sets the root logger to DEBUG so that it spins on
    # every record; every debug call in aiokafka's send path then builds a log
    # record. Without it the worker ran ~10x faster here.
    worker.spinner = None
    gc.set_threshold(*gc_thresholds(cfg.batch_size))
    worker.execute_from_commandline()
