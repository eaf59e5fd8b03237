"""Erasing a forgotten user from the worker's changelog topics, not only from its tables.

    purger = ChangelogPurger(client)
    await purger.purge(tables, sender)      # after a batch with a forget: its partitions' changelogs

A compacted topic keeps a deleted key's old records until the log cleaner
gets to them (never, for the active segment) and its tombstone for a day:
a read of the changelog would still find the user. So for each partition
with a forget, the purge takes each changelog's end offset, writes every
live key of the partition again, and deletes every record before that
offset (Kafka's DeleteRecords). Order makes it safe: any record below the
offset was written before the snapshot was taken, so each live key has a
newer copy above it, and the forgotten user's records (and tombstones) all
lie below it. A crash midway loses nothing: the forget command is
delivered again, and its second application purges again.
"""

from __future__ import annotations

import asyncio
import logging

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, OffsetSpec

from core.errors import KafkaOperationError
from core.kafka.client import ClientConfig
from core.settings import CHANGELOG_TOPIC_CONFIG
from streams.sending import BatchSender, table_value
from streams.tables import WorkerTables

log = logging.getLogger(__name__)


class ChangelogPurger:
    def __init__(self, client: ClientConfig, timeout: float = 30.0) -> None:
        self.client = client
        self.timeout = timeout
        self._admin: AdminClient | None = None

    @property
    def admin(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient(self.client.librdkafka())
        return self._admin

    async def purge(self, tables: WorkerTables, sender: BatchSender) -> int:
        """Purge the changelogs of every partition `tables` marked; returns the records deleted."""
        partitions, tables.to_purge = sorted(tables.to_purge), set()
        loop = asyncio.get_running_loop()
        deleted = 0
        for partition in partitions:
            topics = tables.changelog_topics()
            # The end offsets first, the snapshot after: see the module docstring.
            ends = await loop.run_in_executor(None, self._ends, topics, partition)
            for topic, records in tables.live_records(partition).items():
                for key, value in records.items():
                    sender.add(topic, partition, key, table_value(value))
            await sender.flush()
            deleted += await loop.run_in_executor(None, self._delete_before, ends, partition)
        return deleted

    def _ends(self, topics: list[str], partition: int) -> dict[str, tuple[int, int]]:
        """(log start, end offset) of `partition` of each topic."""
        ends = {}
        for topic in topics:
            tp = TopicPartition(topic, partition)
            low = self.admin.list_offsets({tp: OffsetSpec.earliest()}, request_timeout=self.timeout)[tp].result()
            high = self.admin.list_offsets({tp: OffsetSpec.latest()}, request_timeout=self.timeout)[tp].result()
            ends[topic] = (low.offset, high.offset)
        return ends

    def _delete_before(self, ends: dict[str, tuple[int, int]], partition: int) -> int:
        deleted = 0
        for topic, (low, end) in ends.items():
            if end <= low:
                continue
            tp = TopicPartition(topic, partition, end)
            try:
                self.admin.delete_records([tp], request_timeout=self.timeout)[tp].result()
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.POLICY_VIOLATION:
                    raise KafkaOperationError(
                        f"deleting the records of {topic}[{partition}] before {end} failed: {exc}"
                    ) from None
                # A changelog made by an older adaptloop: compacted only.
                self._allow_deletion(topic)
                self.admin.delete_records([tp], request_timeout=self.timeout)[tp].result()
            deleted += end - low
        log.info("purged partition %d of %s: %d old records deleted", partition, ", ".join(ends), deleted)
        return deleted

    def _allow_deletion(self, topic: str) -> None:
        entries = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in CHANGELOG_TOPIC_CONFIG.items()]
        resource = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=entries)
        self.admin.incremental_alter_configs([resource], request_timeout=self.timeout)[resource].result()
        log.warning("%s allowed DeleteRecords now (%s): it was only compacted", topic, CHANGELOG_TOPIC_CONFIG)
