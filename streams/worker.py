"""`adaptloop worker`: run the streams side (a faust-streaming app, aiokafka driver).

    adaptloop worker [--web-port P] [--config PATH]

Start as many as you like with the same `streams.app_id`: they form one
consumer group and share the partitions; each user is handled by one of them.
Prometheus metrics are served on http://<streams.web_bind>:<web_port>/metrics.
"""

from __future__ import annotations

from adaptloop.kafka.client import ClientConfig
from adaptloop.kafka.topics import TopicPlan, ensure_topics, plans_from_specs
from adaptloop.settings import Settings
from streams.app import WorkerConfig, create_app, internal_topic_name
from streams.curation import CurationConfig
from streams.dataset import DatasetConfig
from streams.processor import ProcessorConfig
from streams.triggers import TriggerConfig


def worker_config(settings: Settings, web_port: int | None = None) -> WorkerConfig:
    """The plain worker config, read from the settings once, here at the edge."""
    s = settings.streams
    t = s.triggers
    processor = ProcessorConfig(
        curation=CurationConfig(**s.curation.model_dump()),
        triggers=TriggerConfig(
            schedule=settings.schedule,
            min_gap_events=settings.min_gap_events,
            gap_window_s=t.gap_window_s,
            cooldown_s=t.cooldown_s,
            continuous_min_interval_s=t.continuous_min_interval_s,
            min_new_examples=t.min_new_examples,
            open_request_timeout_s=t.open_request_timeout_s,
            accuracy_drop=t.accuracy_drop,
            accuracy_floor=t.accuracy_floor,
            accuracy_min_samples=t.accuracy_min_samples,
        ),
        dataset=DatasetConfig(replay_max=s.dataset.replay_max, global_max=s.dataset.global_max, seed=s.curation.seed),
        include_global=s.dataset.include_global,
        max_pending=s.dataset.max_pending,
        accuracy_window=t.accuracy_window,
        auto_rollback=settings.validation.auto_rollback,
        auto_rollback_window_s=settings.validation.auto_rollback_window_s,
    )
    topics = settings.topics
    return WorkerConfig(
        app_id=s.app_id,
        client=ClientConfig.from_settings(settings.kafka),
        input_topics={kind: spec.name for kind, spec in topics.inputs().items()},
        commands_topic=topics.commands.name,
        lifecycle_topic=topics.lifecycle.name,
        requests_topic=topics.training_requests.name,
        dlq_topic=topics.dlq.name,
        storage_root=settings.storage_root,
        processor=processor,
        internal_partitions=s.internal_partitions,
        batch_size=s.batch_size,
        batch_within_s=s.batch_within_s,
        web_port=s.web_port if web_port is None else web_port,
        web_bind=s.web_bind,
        session_timeout_s=settings.kafka.session_timeout_s,
        max_event_bytes=settings.kafka.max_event_bytes,
        nightly_cron=t.nightly_cron,
        schedule=settings.schedule,
        dedupe_window_s=s.dedupe_window_s,
        requests_partitions=topics.training_requests.partitions,
        dlq_partitions=topics.dlq.partitions,
        data_dir=settings.cache_dir / "streams" / s.app_id,
    )


def run_worker(settings: Settings, web_port: int | None = None, loglevel: str = "warning") -> None:
    """Ensure the topics, then run the worker until SIGTERM/SIGINT."""
    import faust

    cfg = worker_config(settings, web_port)
    internal = TopicPlan(internal_topic_name(cfg.app_id), cfg.internal_partitions)
    ensure_topics(cfg.client, [*plans_from_specs(settings.topics.all()), internal])
    app = create_app(cfg)
    worker = faust.Worker(app, loglevel=loglevel.upper(), quiet=True)
    # Faust's start-up spinner sets the root logger to DEBUG so that it spins on
    # every record; every debug call in aiokafka's send path then builds a log
    # record. Without it the worker ran ~10x faster here.
    worker.spinner = None
    worker.execute_from_commandline()
