"""The worker's plain config, built from the settings once, at the edge (`WorkerConfig.from_settings`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from core.kafka.client import ClientConfig
from core.settings import EncryptionSettings, Settings, defaults, worker_data_dir, worker_internal_topic
from streams.processor import ProcessorConfig

# Below the broker's default record-batch limit (message.max.bytes, 1 MiB).
PRODUCER_MAX_BATCH_BYTES = 512 * 1024


def fitting_producer_batch_bytes(client: ClientConfig) -> int:
    """The worker producer's batch size: PRODUCER_MAX_BATCH_BYTES, or less where a topic's own `max.message.bytes`
    (`topics.<name>.config`) is lower (`client.producer_batch_bytes`): the broker refuses a record batch above its
    topic's limit whole."""
    return min(PRODUCER_MAX_BATCH_BYTES, client.producer_batch_bytes or PRODUCER_MAX_BATCH_BYTES)


@dataclass(frozen=True)
class WorkerConfig:
    app_id: str
    client: ClientConfig
    input_topics: dict[str, str]  # input kind -> topic name
    commands_topic: str
    lifecycle_topic: str
    forgotten_topic: str  # read by `adaptloop replay` (the live worker keeps its forgets in its table)
    requests_topic: str
    dlq_topic: str
    storage_root: str
    processor: ProcessorConfig
    internal_partitions: int
    batch_size: int
    batch_within_s: float
    web_port: int
    web_bind: str
    session_timeout_s: float
    max_event_bytes: int
    nightly_cron: str
    schedule: str
    dedupe_window_s: float
    requests_partitions: int
    dlq_partitions: int
    review_requests_topic: str  # labelling tasks (streams/active.py)
    review_requests_partitions: int
    dlq_raw: bool  # dead letters keep the raw bytes (privacy.dlq_raw)
    data_dir: Path  # Faust's local files
    producer_batch_bytes: int = PRODUCER_MAX_BATCH_BYTES  # below every topic's max.message.bytes (fitting_producer_batch_bytes)
    encryption: EncryptionSettings = EncryptionSettings()  # storage.encryption: seal personal files

    @property
    def internal_topic(self) -> str:
        return worker_internal_topic(self.app_id)

    @property
    def source_topics(self) -> list[str]:
        """Everything the worker reads (and whose consumer lag it reports)."""
        return [*self.input_topics.values(), self.commands_topic, self.lifecycle_topic, self.internal_topic]

    @classmethod
    def from_settings(cls, settings: Settings | None = None, web_port: int | None = None, **overrides) -> WorkerConfig:
        s = settings or defaults()
        topics, client = s.topics, ClientConfig.from_settings(s)
        config = cls(
            app_id=s.streams.app_id,
            client=client,
            input_topics={kind: spec.name for kind, spec in topics.inputs().items()},
            commands_topic=topics.commands.name,
            lifecycle_topic=topics.lifecycle.name,
            forgotten_topic=topics.forgotten.name,
            requests_topic=topics.training_requests.name,
            dlq_topic=topics.dlq.name,
            storage_root=s.storage_root,
            encryption=s.storage.encryption,
            processor=ProcessorConfig.from_settings(s),
            internal_partitions=s.streams.internal_partitions,
            batch_size=s.streams.batch_size,
            batch_within_s=s.streams.batch_within_s,
            web_port=s.streams.web_port if web_port is None else web_port,
            web_bind=s.streams.web_bind,
            session_timeout_s=s.kafka.session_timeout_s,
            max_event_bytes=s.kafka.max_event_bytes,
            nightly_cron=s.streams.triggers.nightly_cron,
            schedule=s.schedule,
            dedupe_window_s=s.streams.dedupe_window_s,
            requests_partitions=topics.training_requests.partitions,
            dlq_partitions=topics.dlq.partitions,
            review_requests_topic=topics.review_requests.name,
            review_requests_partitions=topics.review_requests.partitions,
            dlq_raw=s.privacy.dlq_raw,
            data_dir=worker_data_dir(s),
            producer_batch_bytes=fitting_producer_batch_bytes(client),
        )
        return replace(config, **overrides)
