"""The one Faust app of the worker: topics, the table, two agents and a crontab.

Topology (aiokafka driver, agent concurrency 1, batches via take_events):

    interactions.* + adapter.commands + adapter.lifecycle
        --ingest-->  validate raw bytes; bad -> adapter.dlq (with the reason)
                     good -> <app_id>-users (internal, keyed by user_id)
        --users-->   per-user state table (changelog-backed, written once per
                     user per batch) -> dataset snapshot -> adapter.training-requests

Why the internal topic: producers may partition the input topics with any
partitioner, so one user's events can sit in different partitions of different
topics. Re-keying them onto one internal topic (Faust's own partitioner) puts a
user's events, and that user's table entry, in one partition of one worker.
Every write to the table names its changelog partition explicitly (the key's
partition on the internal topic), so it is right even within a batch that
spans partitions, where Faust's "current event" may belong to another one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import faust
from aiokafka.partitioner import murmur2

from adaptloop.errors import InvalidMessage
from adaptloop.kafka.client import ClientConfig
from adaptloop.storage import ArtifactStore
from schemas import COMMAND_ADAPTER, LifecycleEvent
from schemas.deadletter import DeadLetter
from schemas.decode import decode
from schemas.events import EVENT_TYPE_BY_INPUT_KIND
from schemas.training import Provenance
from streams import metrics
from streams.processor import BatchStats, Envelope, ProcessorConfig, UserProcessor
from streams.state import UserState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    app_id: str
    client: ClientConfig
    input_topics: dict[str, str]  # input kind -> topic name
    commands_topic: str
    lifecycle_topic: str
    requests_topic: str
    dlq_topic: str
    storage_root: str
    processor: ProcessorConfig
    internal_partitions: int = 6
    batch_size: int = 1000
    batch_within_s: float = 0.5
    web_port: int = 6066
    max_event_bytes: int = 64 * 1024
    nightly_cron: str = "0 2 * * *"
    schedule: str = "threshold"


def partition_of(key: bytes, partitions: int) -> int:
    """The partition Faust's (aiokafka's default) partitioner gives `key`."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def _broker_kwargs(client: ClientConfig) -> dict:
    kwargs: dict = {"broker": [f"kafka://{hp.strip()}" for hp in client.bootstrap_servers.split(",")]}
    if client.security_protocol != "PLAINTEXT":
        from faust.auth import SASLCredentials, SSLCredentials

        ssl_context = client.aiokafka().get("ssl_context")
        if client.sasl_mechanism:
            kwargs["broker_credentials"] = SASLCredentials(
                username=client.sasl_username,
                password=client.sasl_password.get_secret_value() if client.sasl_password else None,
                mechanism=client.sasl_mechanism,
                ssl_context=ssl_context,
            )
        else:
            kwargs["broker_credentials"] = SSLCredentials(ssl_context)
    return kwargs


def create_app(cfg: WorkerConfig) -> faust.App:
    app = faust.App(
        cfg.app_id,
        **_broker_kwargs(cfg.client),
        store="memory://",
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        topic_partitions=cfg.internal_partitions,
        topic_replication_factor=1,
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=cfg.web_port > 0,
        web_port=cfg.web_port or 6066,
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        producer_acks=-1,
        stream_wait_empty=False,
        broker_commit_every=cfg.batch_size,
        broker_commit_interval=1.0,
    )
    kind_by_topic = {name: kind for kind, name in cfg.input_topics.items()}
    store = ArtifactStore(cfg.storage_root)
    processor = UserProcessor(cfg.processor, store)

    inputs = app.topic(*cfg.input_topics.values(), cfg.commands_topic, cfg.lifecycle_topic, key_type=bytes, value_type=bytes)
    internal = app.topic(f"{cfg.app_id}-users", partitions=cfg.internal_partitions, internal=True, key_type=bytes, value_type=bytes)
    dlq = app.topic(cfg.dlq_topic, key_type=bytes, value_type=bytes)
    requests = app.topic(cfg.requests_topic, key_type=bytes, value_type=bytes)
    users = app.Table(
        "users",
        default=None,
        partitions=cfg.internal_partitions,
        key_type=bytes,  # raw user_id bytes, as on the internal topic; values are JSON
    )

    def save(key: bytes, state: UserState) -> None:
        """Write one user's state: the local store and its changelog partition."""
        value = state.dump()
        users.data[key] = value
        users.send_changelog(partition_of(key, cfg.internal_partitions), key, value)

    def to_envelope(topic: str, partition: int, offset: int, raw: bytes | None) -> tuple[bytes, Envelope]:
        """Validate one input message; raise InvalidMessage with the reason."""
        if topic in kind_by_topic:
            kind = kind_by_topic[topic]
            event = decode(EVENT_TYPE_BY_INPUT_KIND[kind], raw, cfg.max_event_bytes)
            prov = Provenance(topic=topic, partition=partition, offset=offset)
            return event.user_id.encode(), Envelope(k="event", kind=kind, body=event.model_dump(mode="json"), prov=prov)
        if topic == cfg.commands_topic:
            command = decode(COMMAND_ADAPTER, raw, cfg.max_event_bytes)
            body = command.model_dump(mode="json")
            return command.user_id.encode(), Envelope(k="command", body=body, at=command.requested_at.timestamp())
        lifecycle = decode(LifecycleEvent, raw, cfg.max_event_bytes)
        return lifecycle.user_id.encode(), Envelope(k="lifecycle", body=lifecycle.model_dump(mode="json"))

    @app.agent(inputs, concurrency=1)
    async def ingest(stream):
        """Validate every input message from its raw bytes; forward or dead-letter it."""
        async for events in stream.take_events(cfg.batch_size, within=cfg.batch_within_s):
            started = time.perf_counter()
            for event in events:
                msg = event.message
                metrics.EVENTS.labels(msg.topic).inc()
                try:
                    key, env = to_envelope(msg.topic, msg.partition, msg.offset, event.value)
                except InvalidMessage as exc:
                    metrics.DEAD_LETTERS.labels(msg.topic).inc()
                    letter = DeadLetter.of(
                        topic=msg.topic, partition=msg.partition, offset=msg.offset,
                        key=msg.key, value=event.value, reason=exc.reason,
                    )  # fmt: skip
                    await dlq.send(key=msg.key, value=letter.to_bytes())
                    continue
                await internal.send(
                    key=key,
                    value=env.model_dump_json(exclude_none=True).encode(),
                    partition=partition_of(key, cfg.internal_partitions),
                )
            metrics.BATCH_SECONDS.labels("ingest").observe(time.perf_counter() - started)

    @app.agent(internal, concurrency=1)
    async def per_user(stream):
        """Count, curate and trigger per user; one table write per user per batch."""
        async for events in stream.take_events(cfg.batch_size, within=cfg.batch_within_s):
            started = time.perf_counter()
            by_user: dict[bytes, list[Envelope]] = {}
            ticks: list[tuple[int, float]] = []
            for event in events:
                env = Envelope.model_validate_json(event.value)
                if env.k == "tick":
                    ticks.append((event.message.partition, env.at or time.time()))
                else:
                    by_user.setdefault(event.key, []).append(env)
            stats = BatchStats()
            outgoing = []
            for key, envelopes in by_user.items():
                state = UserState.load(users.get(key))
                outgoing += [(key, r) for r in processor.handle(key.decode(), state, envelopes, stats)]
                save(key, state)
            for partition, at in ticks:
                for key in [k for k in list(users.keys()) if partition_of(k, cfg.internal_partitions) == partition]:
                    state = UserState.load(users.get(key))
                    produced = processor.on_tick(key.decode(), state, at, stats)
                    if produced:
                        outgoing += [(key, r) for r in produced]
                        save(key, state)
            for key, request in outgoing:
                await requests.send(key=key, value=request.to_bytes())
                log.info("training request %s for %s (%s)", request.request_id, request.user_id, request.trigger)
            metrics.DUPLICATES.inc(stats.duplicates)
            for source, n in stats.examples.items():
                metrics.EXAMPLES.labels(source).inc(n)
            for trigger, n in stats.requests.items():
                metrics.REQUESTS.labels(trigger).inc(n)
            metrics.BATCH_SECONDS.labels("users").observe(time.perf_counter() - started)

    if cfg.schedule == "nightly":

        @app.crontab(cfg.nightly_cron, on_leader=True)
        async def nightly() -> None:
            await publish_ticks(internal, cfg.internal_partitions, time.time())

    @app.page("/metrics")
    async def metrics_page(web, request):
        return web.bytes(metrics.render(), content_type="text/plain; version=0.0.4")

    app.adaptloop_internal_topic = internal  # type: ignore[attr-defined]
    return app


async def publish_ticks(internal_topic, partitions: int, at: float) -> None:
    """The nightly schedule: one tick per internal partition; each owner handles its users."""
    body = Envelope(k="tick", at=at).model_dump_json(exclude_none=True).encode()
    for partition in range(partitions):
        await internal_topic.send(key=None, value=body, partition=partition)
