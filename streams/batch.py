"""One stream batch of the worker's agent: validate, dead-letter, reroute, apply per user, send.

    handle = BatchHandler(cfg, processor, tables, sender)
    sent = await handle(messages)   # the source messages of one fetch (streams/fetch.py)
    await sent                      # their outputs acknowledged: the messages may be acked

Events are validated here (bad ones go to the dead-letter topic with the
reason), grouped by user, and each user's envelopes applied to the user's
state once per batch (streams/tables.py). The outputs go out in phases
(streams/sending.py) and are acknowledged before the batch's input offsets
can be committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable

from core.errors import InvalidMessage
from schemas.commands import RollbackCommand
from schemas.deadletter import DeadLetter
from schemas.lifecycle import LifecycleEvent
from schemas.review_requests import ReviewRequest
from streams import metrics
from streams.config import WorkerConfig
from streams.decoding import SourceDecoder, partition_of
from streams.envelope import Envelope
from streams.processor import BatchStats, UserProcessor
from streams.purge import ChangelogPurger
from streams.sending import PHASE_MARKS, BatchSender
from streams.tables import Outgoing, WorkerTables

log = logging.getLogger(__name__)


class BatchHandler:
    def __init__(
        self,
        cfg: WorkerConfig,
        processor: UserProcessor,
        tables: WorkerTables,
        sender: BatchSender,
        purger: ChangelogPurger | None = None,
    ) -> None:
        """`purger` None: a forget drops the user's keys and tombstones them, but old changelog records stay."""
        self.cfg = cfg
        self.purger = purger
        self.processor = processor
        self.tables = tables
        self.sender = sender
        self.decode = SourceDecoder(cfg.input_topics, cfg.commands_topic, cfg.max_event_bytes)

    async def __call__(self, messages: list) -> Awaitable[None]:
        """Work the batch out and start its sends; the awaitable is done once Kafka acknowledged them all.

        The sends go out after the previous batch's (streams/sending.py), so
        the next batch can be worked on while these wait for the broker.
        """
        started = time.perf_counter()
        by_user, ticks = self._sort(messages)
        stats = BatchStats()
        outgoing = self.tables.apply(self.processor, by_user, stats)
        for partition, at in ticks:
            outgoing += self.tables.tick(self.processor, partition, at, stats)
        self.tables.writer.stage()
        self._queue(outgoing)
        sent = self.sender.start()
        if self.tables.to_purge and self.purger is not None:
            await sent  # a purge rewrites what the partition holds now: nothing may overtake it
            await self.purger.purge(self.tables, self.sender)
        return asyncio.ensure_future(self._reported(sent, outgoing, stats, started))

    async def _reported(self, sent: Awaitable[int], outgoing: Outgoing, stats: BatchStats, started: float) -> None:
        await sent
        self._report(outgoing, stats, started)

    def _sort(self, messages: list) -> tuple[dict[bytes, list[Envelope]], list[tuple[int, float]]]:
        """Envelopes by user (in order), and the nightly ticks; invalid events are dead-lettered, strays rerouted."""
        by_user: dict[bytes, list[Envelope]] = {}
        ticks: list[tuple[int, float]] = []
        internal = self.cfg.internal_topic
        consumed: Counter[str] = Counter()
        for msg in messages:
            if msg.topic == internal:
                env = Envelope.model_validate_json(msg.value)
                if env.k == "tick":
                    ticks.append((msg.partition, env.at or time.time()))
                else:
                    by_user.setdefault(msg.key, []).append(env)
                continue
            consumed[msg.topic] += 1
            try:
                key, env = self.decode(msg.topic, msg.partition, msg.offset, msg.value)
            except InvalidMessage as exc:
                self._dead_letter(msg, msg.value, exc.reason)
                continue
            if env.k == "lifecycle" and env.body.get("type") == "forgotten":
                continue  # keyed by a salted hash, about nobody the worker still holds
            home = partition_of(key, self.cfg.internal_partitions)
            if msg.partition == home:
                by_user.setdefault(key, []).append(env)
            else:
                # Partitioned by another partitioner: this user's state lives
                # in partition `home`, maybe on another worker. Route it there.
                metrics.REROUTED.inc()
                self.sender.add(internal, home, key, env.to_wire())
        for topic, n in consumed.items():
            metrics.EVENTS.labels(topic).inc(n)
        return by_user, ticks

    def _dead_letter(self, msg, value: bytes | None, reason: str) -> None:
        metrics.DEAD_LETTERS.labels(msg.topic).inc()
        letter = DeadLetter.of(
            topic=msg.topic,
            partition=msg.partition,
            offset=msg.offset,
            key=msg.key,
            value=value,
            reason=reason,
            redactor=self.processor.cfg.redactor,
            keep_raw=self.cfg.dlq_raw,
        )
        dlq_partition = partition_of(msg.key, self.cfg.dlq_partitions) if msg.key else 0
        self.sender.add(self.cfg.dlq_topic, dlq_partition, msg.key, letter.to_bytes())

    def _queue(self, outgoing: Outgoing) -> None:
        """Requests, rollback commands and skips go out last (PHASE_MARKS), each to its user's partition."""
        for key, message in outgoing:
            if isinstance(message, RollbackCommand):  # commands share the worker's partitioning
                topic, partition = self.cfg.commands_topic, partition_of(key, self.cfg.internal_partitions)
            elif isinstance(message, LifecycleEvent):  # so does the lifecycle topic
                topic, partition = self.cfg.lifecycle_topic, partition_of(key, self.cfg.internal_partitions)
            elif isinstance(message, ReviewRequest):  # labelling tasks, by user
                topic, partition = self.cfg.review_requests_topic, partition_of(key, self.cfg.review_requests_partitions)
            else:
                topic, partition = self.cfg.requests_topic, partition_of(key, self.cfg.requests_partitions)
            self.sender.add(topic, partition, key, message.to_bytes(), PHASE_MARKS)

    def _report(self, outgoing: Outgoing, stats: BatchStats, started: float) -> None:
        for _key, message in outgoing:
            if isinstance(message, RollbackCommand):
                log.warning("rollback command %s for %s: %s", message.command_id, message.user_id, message.reason)
            elif isinstance(message, LifecycleEvent):
                log.info("%s for %s (job %s): %s", message.type, message.user_id, message.job_id, message.reason)
            elif isinstance(message, ReviewRequest):
                log.debug("labelling task %s for %s: %s", message.review_request_id, message.user_id, message.status)
            else:
                log.info("training request %s for %s (%s)", message.request_id, message.user_id, message.trigger)
        metrics.PROCESSED.inc(stats.events)
        metrics.DUPLICATES.inc(stats.duplicates)
        metrics.NOT_TRAINED.inc(stats.not_trained)
        metrics.FORGOTTEN.inc(stats.forgotten)
        for source, n in stats.examples.items():
            metrics.EXAMPLES.labels(source).inc(n)
        for trigger, n in stats.requests.items():
            metrics.REQUESTS.labels(trigger).inc(n)
        for kind, n in stats.redacted.items():
            metrics.REDACTED.labels(kind).inc(n)
        for status, n in stats.tasks.items():
            metrics.REVIEW_REQUESTS.labels(status).inc(n)
        metrics.BATCH_SECONDS.labels("process").observe(time.perf_counter() - started)
