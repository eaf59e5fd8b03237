"""The one Faust app of the worker: topics, three tables, one agent and a crontab.

Topology (aiokafka driver, agent concurrency 1, batches via take_events):

    interactions.* + adapter.commands + adapter.lifecycle + <app_id>-users
        --process-->  validate raw bytes; bad -> adapter.dlq (with the reason)
                      good -> per-user state (changelog-backed tables, written
                      once per user per batch) -> dataset snapshot ->
                      adapter.training-requests

All source topics have the same partition count, and a user's state lives in
partition murmur2(user_id) % N (Kafka's default partitioner, which Java
clients, aiokafka and confluent-kafka with `partitioner=murmur2_random` use).
An event that another partitioner put elsewhere is rerouted once through the
internal topic `<app_id>-users` to its home partition, so each user is handled
by exactly one worker whatever the producers do, and well-partitioned events
pay for no extra hop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import faust
from aiokafka.partitioner import murmur2

from adaptloop.errors import InvalidMessage
from adaptloop.kafka.client import ClientConfig
from adaptloop.storage import ArtifactStore
from schemas import COMMAND_ADAPTER, LifecycleEvent, RollbackCommand
from schemas.deadletter import DeadLetter
from schemas.decode import decode
from schemas.events import EVENT_TYPE_BY_INPUT_KIND
from schemas.training import Provenance, TrainingExample
from streams import faust_fixes, metrics
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
    web_bind: str = "127.0.0.1"
    session_timeout_s: float = 45.0
    max_event_bytes: int = 64 * 1024
    nightly_cron: str = "0 2 * * *"
    schedule: str = "threshold"
    dedupe_window_s: float = 7 * 24 * 3600
    requests_partitions: int = 6
    dlq_partitions: int = 1
    data_dir: Path | None = None  # Faust's local files; None: "<app_id>-data" in the working directory (Faust's default)


def internal_topic_name(app_id: str) -> str:
    return f"{app_id}-users"


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
    faust_fixes.apply()
    if cfg.data_dir is not None:
        cfg.data_dir.mkdir(parents=True, exist_ok=True)  # Faust makes only the last level
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
        web_bind=cfg.web_bind,
        web_host="127.0.0.1",
        producer_acks=-1,
        stream_wait_empty=False,
        table_standby_replicas=0,  # tables are rebuilt from their changelogs on (re)assignment
        broker_commit_every=cfg.batch_size,
        broker_commit_interval=1.0,
        broker_session_timeout=cfg.session_timeout_s,
        broker_heartbeat_interval=min(3.0, cfg.session_timeout_s / 3),
        **({"datadir": str(cfg.data_dir)} if cfg.data_dir is not None else {}),
    )
    to_envelope = SourceDecoder(cfg.input_topics, cfg.commands_topic, cfg.max_event_bytes)
    store = ArtifactStore(cfg.storage_root)
    processor = UserProcessor(cfg.processor, store)

    internal = app.topic(internal_topic_name(cfg.app_id), partitions=cfg.internal_partitions, internal=True, key_type=bytes, value_type=bytes)
    # One agent reads everything: Faust assigns partition p of every source
    # topic (and of the tables' changelogs) to the same worker.
    sources = app.topic(
        *cfg.input_topics.values(), cfg.commands_topic, cfg.lifecycle_topic, internal.get_topic_name(),
        key_type=bytes, value_type=bytes,
    )  # fmt: skip
    # Three tables, all keyed by raw bytes that start with the user_id and all
    # partitioned like the internal topic; values are JSON.
    users = app.Table("users", default=None, partitions=cfg.internal_partitions, key_type=bytes)
    seen = app.Table("seen", default=None, partitions=cfg.internal_partitions, key_type=bytes)
    examples = app.Table("examples", default=None, partitions=cfg.internal_partitions, key_type=bytes)

    # Parsed states by key, valid while the table still holds the very dict we
    # wrote (recovery or a rebalance put new objects there): parsing a user's
    # state once per batch cost more than the work on it.
    live: dict[bytes, tuple[dict, UserState]] = {}

    def load(key: bytes) -> UserState:
        raw = users.data.get(key)
        cached = live.get(key)
        if cached is not None and cached[0] is raw:
            return cached[1]
        return UserState.load(raw)

    def save(key: bytes, state: UserState) -> None:
        value = state.dump()
        live[key] = (value, state)
        writer.put(users, partition_of(key, cfg.internal_partitions), key, value, PHASE_STATE)

    def dead_letter(msg, value: bytes | None, reason: str) -> None:
        metrics.DEAD_LETTERS.labels(msg.topic).inc()
        letter = DeadLetter.of(topic=msg.topic, partition=msg.partition, offset=msg.offset, key=msg.key, value=value, reason=reason)
        dlq_partition = partition_of(msg.key, cfg.dlq_partitions) if msg.key else 0
        out.add(cfg.dlq_topic, dlq_partition, msg.key, letter.to_bytes())

    internal_name = internal.get_topic_name()
    out = BatchSender(app)
    writer = ChangelogWriter(out)

    @app.agent(sources, concurrency=1)
    async def process(stream):
        """Validate, dead-letter, count, curate and trigger; one state write per user per batch."""
        async for events in stream.take_events(cfg.batch_size, within=cfg.batch_within_s):
            started = time.perf_counter()
            by_user: dict[bytes, list[Envelope]] = {}
            ticks: list[tuple[int, float]] = []
            for event in events:
                msg = event.message
                if msg.topic == internal_name:
                    env = Envelope.model_validate_json(event.value)
                    if env.k == "tick":
                        ticks.append((msg.partition, env.at or time.time()))
                    else:
                        by_user.setdefault(msg.key, []).append(env)
                    continue
                metrics.EVENTS.labels(msg.topic).inc()
                try:
                    key, env = to_envelope(msg.topic, msg.partition, msg.offset, event.value)
                except InvalidMessage as exc:
                    dead_letter(msg, event.value, exc.reason)
                    continue
                home = partition_of(key, cfg.internal_partitions)
                if msg.partition == home:
                    by_user.setdefault(key, []).append(env)
                else:
                    # Partitioned by another partitioner: this user's state lives
                    # in partition `home`, maybe on another worker. Route it there.
                    metrics.REROUTED.inc()
                    out.add(internal_name, home, key, env.to_wire())
            stats = BatchStats()
            outgoing = handle_users(processor, by_user, load, save, seen, examples, writer, cfg.internal_partitions, stats)
            for partition, at in ticks:
                for key in [k for k in list(users.data.keys()) if partition_of(k, cfg.internal_partitions) == partition]:
                    state = load(key)
                    user_log = TableUserLog(key, partition, seen, examples, writer)
                    produced = processor.on_tick(key.decode(), state, user_log, at, stats)
                    if produced:
                        outgoing += [(key, r) for r in produced]
                        save(key, state)
            writer.stage()
            for key, message in outgoing:
                if isinstance(message, RollbackCommand):  # commands share the worker's partitioning
                    out.add(cfg.commands_topic, partition_of(key, cfg.internal_partitions), key, message.to_bytes(), PHASE_MARKS)
                else:
                    out.add(cfg.requests_topic, partition_of(key, cfg.requests_partitions), key, message.to_bytes(), PHASE_MARKS)
            await out.flush()
            for key, message in outgoing:
                if isinstance(message, RollbackCommand):
                    log.warning("rollback command %s for %s: %s", message.command_id, message.user_id, message.reason)
                else:
                    log.info("training request %s for %s (%s)", message.request_id, message.user_id, message.trigger)
            metrics.PROCESSED.inc(stats.events)
            metrics.DUPLICATES.inc(stats.duplicates)
            for source, n in stats.examples.items():
                metrics.EXAMPLES.labels(source).inc(n)
            for trigger, n in stats.requests.items():
                metrics.REQUESTS.labels(trigger).inc(n)
            metrics.BATCH_SECONDS.labels("process").observe(time.perf_counter() - started)

    if cfg.schedule == "nightly":

        @app.crontab(cfg.nightly_cron, on_leader=True)
        async def nightly() -> None:
            await publish_ticks(internal, cfg.internal_partitions, time.time())

    @app.timer(interval=max(60.0, cfg.dedupe_window_s / 24))
    async def forget_old_event_ids() -> None:
        """Bound the dedupe memory: forget ids first seen longer ago than the window."""
        cutoff = time.time() - cfg.dedupe_window_s
        pruner_out = BatchSender(app)
        pruner = ChangelogWriter(pruner_out)
        for key in [k for k, at in list(seen.data.items()) if at is not None and at < cutoff]:
            pruner.delete(seen, partition_of(key.split(b"\x00", 1)[0], cfg.internal_partitions), key)
        pruner.stage()
        await pruner_out.flush()

    metrics.watch_lag(cfg.client, cfg.app_id, [*cfg.input_topics.values(), cfg.commands_topic, cfg.lifecycle_topic, internal_name])

    @app.page("/metrics")
    async def metrics_page(web, request):
        # The lag lookup asks the broker: off the event loop.
        body = await asyncio.get_running_loop().run_in_executor(None, metrics.render)
        return web.bytes(body, content_type="text/plain; version=0.0.4")

    return app


class SourceDecoder:
    """Turns one raw source message into (user key, Envelope); raises InvalidMessage with the reason."""

    def __init__(self, input_topics: dict[str, str], commands_topic: str, max_event_bytes: int) -> None:
        self.kind_by_topic = {name: kind for kind, name in input_topics.items()}
        self.commands_topic = commands_topic
        self.max_event_bytes = max_event_bytes

    def __call__(self, topic: str, partition: int, offset: int, raw: bytes | None) -> tuple[bytes, Envelope]:
        if topic in self.kind_by_topic:
            kind = self.kind_by_topic[topic]
            event = decode(EVENT_TYPE_BY_INPUT_KIND[kind], raw, self.max_event_bytes)
            prov = Provenance(topic=topic, partition=partition, offset=offset)
            return event.user_id.encode(), Envelope(k="event", kind=kind, prov=prov, parsed=event)
        if topic == self.commands_topic:
            command = decode(COMMAND_ADAPTER, raw, self.max_event_bytes)
            body = command.model_dump(mode="json")
            return command.user_id.encode(), Envelope(k="command", body=body, at=command.requested_at.timestamp())
        lifecycle = decode(LifecycleEvent, raw, self.max_event_bytes)
        return lifecycle.user_id.encode(), Envelope(k="lifecycle", body=lifecycle.model_dump(mode="json"))


def handle_users(processor: UserProcessor, by_user: dict[bytes, list[Envelope]], load, save, seen, examples, writer,
                 partitions: int, stats: BatchStats) -> list[tuple[bytes, object]]:  # fmt: skip
    """One batch: each user's envelopes applied to the user's state (one load and one save per user).

    Returns the (user key, TrainingRequest | RollbackCommand) pairs to send.
    Shared by the Faust agent and `adaptloop replay`.
    """
    outgoing = []
    for key, envelopes in by_user.items():
        state = load(key)
        user_log = TableUserLog(key, partition_of(key, partitions), seen, examples, writer)
        outgoing += [(key, r) for r in processor.handle(key.decode(), state, user_log, envelopes, stats)]
        save(key, state)
    return outgoing


# A crash may cut a batch's sends anywhere, so they go out in this order, each
# phase acknowledged before the next: (1) new examples, dead letters, the
# internal hop; (2) the users' states; (3) event-id marks, training requests,
# rollback commands and the removal of examples a request took. What a crash
# leaves is then repairable: examples beyond a lost state are rewritten when
# the batch is processed again, and marks or a request lost after a state
# landed are sent again by the next run (UserProcessor._repair_after_crash).
PHASE_FIRST, PHASE_STATE, PHASE_MARKS = 0, 1, 2


class BatchSender:
    """Messages of one stream batch, sent as one Kafka batch per topic partition.

    Faust's `topic.send()` and table writes cost ~0.2 ms of Python per message
    (its send-soon buffer even sends one message at a time); that capped the
    worker below 1,000 events/s here. This groups the batch's messages by
    topic partition and hands each group to aiokafka's `send_batch()` in one
    call, then waits for the acknowledgements before the stream acks the
    batch's input events: a batch's outputs are durable before its offsets can
    be committed (at-least-once, with dedupe downstream).
    """

    def __init__(self, app: faust.App) -> None:
        self.app = app
        self._groups: dict[tuple[int, str, int], list[tuple[bytes | None, bytes | None]]] = {}

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes | None, phase: int = PHASE_FIRST) -> None:
        self._groups.setdefault((phase, topic, partition), []).append((key, value))

    async def flush(self) -> int:
        """Send every message, phase by phase: a phase goes out only once the one before is acknowledged."""
        groups, self._groups = self._groups, {}
        producer = self.app.producer._ensure_producer()  # the aiokafka producer Faust runs
        for phase in sorted({phase for phase, _topic, _partition in groups}):
            acks = []
            for (_phase, topic, partition), messages in ((k, v) for k, v in groups.items() if k[0] == phase):
                batch = producer.create_batch()
                for key, value in messages:
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        acks.append(await producer.send_batch(batch, topic, partition=partition))
                        batch = producer.create_batch()
                        batch.append(key=key, value=value, timestamp=None)
                acks.append(await producer.send_batch(batch, topic, partition=partition))
            await asyncio.gather(*acks)
        return sum(len(m) for m in groups.values())


class ChangelogWriter:
    """Table writes: applied to the local store at once, sent with the batch.

    The partition is named explicitly: Faust would take it from the "current
    event", which in a batch spanning partitions may be another user's. Only
    the latest value per key within a batch is sent.
    """

    def __init__(self, sender: BatchSender) -> None:
        self.sender = sender
        self._pending: dict[tuple[str, bytes], tuple[str, int, bytes | None, int]] = {}

    def put(self, table, partition: int, key: bytes, value, phase: int = PHASE_FIRST) -> None:
        table.data[key] = value
        self._pending[(table.name, key)] = (table.changelog_topic.get_topic_name(), partition, json.dumps(value).encode(), phase)

    def delete(self, table, partition: int, key: bytes, phase: int = PHASE_MARKS) -> None:
        table.data.pop(key, None)
        self._pending[(table.name, key)] = (table.changelog_topic.get_topic_name(), partition, None, phase)

    def stage(self) -> None:
        """Hand the writes to the sender (which `flush()` then sends)."""
        pending, self._pending = self._pending, {}
        for (_name, key), (topic, partition, value, phase) in pending.items():
            self.sender.add(topic, partition, key, value, phase)


class TableUserLog:
    """A user's `UserLog` in the worker's `seen` and `examples` tables."""

    def __init__(self, user_key: bytes, partition: int, seen_table, examples_table, writer: ChangelogWriter) -> None:
        self.prefix = user_key + b"\x00"
        self.writer = writer
        self.partition = partition
        self.seen_table = seen_table
        self.examples_table = examples_table

    def seen(self, event_id: str) -> bool:
        return self.prefix + event_id.encode() in self.seen_table.data

    def mark_seen(self, event_id: str, at: float) -> None:
        # Wall-clock time of first sight: old (backfilled) events are remembered too.
        # Sent after the state (PHASE_MARKS): see UserProcessor._repair_after_crash.
        self.writer.put(self.seen_table, self.partition, self.prefix + event_id.encode(), time.time(), PHASE_MARKS)

    def _example_key(self, seq: int) -> bytes:
        return self.prefix + b"%016d" % seq

    def get_example(self, seq: int) -> TrainingExample | None:
        raw = self.examples_table.data.get(self._example_key(seq))
        return None if raw is None else TrainingExample.model_validate(raw)

    def put_example(self, seq: int, example: TrainingExample) -> None:
        self.writer.put(self.examples_table, self.partition, self._example_key(seq), example.model_dump(mode="json", exclude_none=True))

    def drop_example(self, seq: int) -> None:
        self.writer.delete(self.examples_table, self.partition, self._example_key(seq))


async def publish_ticks(internal_topic, partitions: int, at: float) -> None:
    """The nightly schedule: one tick per internal partition; each owner handles its users."""
    body = Envelope(k="tick", at=at).to_wire()
    for partition in range(partitions):
        await internal_topic.send(key=None, value=body, partition=partition)
