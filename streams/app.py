"""The one Faust app of the worker: topics, three tables, one batch drain, a timer and a crontab.

Topology (aiokafka driver; the consumer's fetches go to one batch handler, streams/fetch.py):

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

This module only wires: how batches are fetched is streams/fetch.py, what a
batch does streams/batch.py, the tables streams/tables.py, the sends
streams/sending.py.
"""

from __future__ import annotations

import asyncio
import time

import faust

from core.encryption import open_store
from core.forgotten import UserHasher
from core.kafka.client import ClientConfig
from core.settings import CHANGELOG_TOPIC_CONFIG, WORKER_TABLES
from streams import faust_fixes, fetch, metrics
from streams.batch import BatchHandler
from streams.config import WorkerConfig
from streams.envelope import Envelope
from streams.processor import UserProcessor
from streams.purge import ChangelogPurger
from streams.sending import BatchSender, ChangelogWriter
from streams.tables import FaustTable, WorkerTables


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


def faust_app(cfg: WorkerConfig) -> faust.App:
    """The Faust app the worker's settings describe, before its topics, tables and handlers are added
    (`create_app` adds them): its broker, producer and commit settings in one place."""
    cfg.data_dir.mkdir(parents=True, exist_ok=True)  # Faust makes only the last level
    return faust.App(
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
        # A batch's sends go out per topic partition in aiokafka batches, and
        # aiokafka holds one batch per partition until the one before is sent,
        # with one request in flight per broker: at the 16 KiB default, a batch
        # of states took several round trips per send phase.
        producer_max_batch_size=cfg.producer_batch_bytes,  # below every topic's max.message.bytes
        # A rebalance (and a graceful stop) waits for the batch whose sends are in flight: its messages stay
        # unacked until its outputs are acknowledged (streams/fetch.py), so no record of it lands after its
        # partitions moved, where it could overwrite a newer state their new owner had written.
        stream_wait_empty=True,
        table_standby_replicas=0,  # tables are rebuilt from their changelogs on (re)assignment
        broker_commit_every=cfg.batch_size,
        broker_commit_interval=1.0,
        broker_session_timeout=cfg.session_timeout_s,
        broker_heartbeat_interval=min(3.0, cfg.session_timeout_s / 3),
        datadir=str(cfg.data_dir),
    )


def create_app(cfg: WorkerConfig) -> faust.App:
    faust_fixes.apply()
    app = faust_app(cfg)
    internal = app.topic(cfg.internal_topic, partitions=cfg.internal_partitions, internal=True, key_type=bytes, value_type=bytes)
    # One consumer reads everything: Faust assigns partition p of every source
    # topic (and of the tables' changelogs) to the same worker.
    sources = app.topic(*cfg.source_topics, key_type=bytes, value_type=bytes)
    tables = {
        name: FaustTable(
            app.Table(
                name,
                default=None,
                partitions=cfg.internal_partitions,
                key_type=bytes,
                extra_topic_configs=CHANGELOG_TOPIC_CONFIG,  # a forget purges old records (streams/purge.py)
            )
        )
        for name in WORKER_TABLES
    }
    store = open_store(cfg.storage_root, cfg.encryption)
    sender = BatchSender(lambda: app.producer._ensure_producer())  # the aiokafka producer Faust runs
    worker_tables = WorkerTables(tables, ChangelogWriter(sender), cfg.internal_partitions, UserHasher.for_store(store))
    handle_batch = BatchHandler(cfg, UserProcessor(cfg.processor, store), worker_tables, sender, ChangelogPurger(cfg.client))

    # No agent: each fetch of the sources goes to the batch handler at once
    # (streams/fetch.py); the conductor only needs to know what to subscribe to.
    app.topics.add(sources)
    fetch.install(app, cfg.source_topics, handle_batch, cfg.batch_size, cfg.batch_within_s)

    if cfg.schedule == "nightly":

        @app.crontab(cfg.nightly_cron, on_leader=True)
        async def nightly() -> None:
            await publish_ticks(internal, cfg.internal_partitions, time.time())

    @app.timer(interval=max(60.0, cfg.dedupe_window_s / 24))
    async def forget_old_event_ids() -> None:
        """Bound the dedupe memory: forget ids first seen longer ago than the window."""
        pruner = BatchSender(lambda: app.producer._ensure_producer())
        writer = ChangelogWriter(pruner)
        worker_tables.forget_marks_before(time.time() - cfg.dedupe_window_s, writer)
        writer.stage()
        await pruner.flush()

    metrics.watch_lag(cfg.client, cfg.app_id, cfg.source_topics)

    @app.page("/metrics")
    async def metrics_page(web, request):
        # The lag lookup asks the broker: off the event loop.
        body = await asyncio.get_running_loop().run_in_executor(None, metrics.render)
        return web.bytes(body, content_type="text/plain; version=0.0.4")

    return app


async def publish_ticks(internal_topic, partitions: int, at: float) -> None:
    """The nightly schedule: one tick per internal partition; each owner handles its users."""
    body = Envelope(k="tick", at=at).to_wire()
    for partition in range(partitions):
        await internal_topic.send(key=None, value=body, partition=partition)
