"""Small, blocking Kafka helpers over confluent-kafka: produce and wait for the acknowledgements; read
exactly the records between offsets planned from timestamps (no consumer group, nothing committed).

Used by the CLI (`publish`, `replay`, `generate-data`, the demo) and the tests; the long-running
services have their own loops.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer

from core.errors import KafkaOperationError
from core.kafka.client import ClientConfig


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int

    @classmethod
    def of(cls, msg: Message) -> Record:
        """A fetched message as a record (a fetched message always has its topic, partition and offset)."""
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        assert topic is not None and partition is not None and offset is not None
        return cls(topic, partition, offset, msg.key(), msg.value(), msg.timestamp()[1])


def next_message(consumer: Consumer, timeout: float, what: str) -> Message | None:
    """The next message, or None when nothing came (a partition's end counts as nothing); errors raise."""
    return _checked(consumer.poll(timeout), what)


def _checked(msg: Message | None, what: str) -> Message | None:
    """`msg`, or None for nothing or a partition's end; an error raises."""
    if msg is None:
        return None
    error = msg.error()
    if error is not None:
        if error.code() == KafkaError._PARTITION_EOF:
            return None
        raise KafkaOperationError(f"{what} failed: {error}")
    return msg


def produce(client: ClientConfig, topic: str, messages: Iterable[tuple], timeout: float = 60.0) -> int:
    """Send (key, value[, timestamp_ms[, partition]]) tuples to `topic`; wait for every acknowledgement.

    A timestamp of None means now; without a partition, the key's murmur2
    hash picks it. Returns the count. The process keeps one producer per
    `client` for the next call (`kept_producer`); after a failure the next
    call starts a new one.
    """
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(str(err))

    count = 0
    with kept_producer(client, timeout) as producer:
        for key, value, *more in messages:
            stamp, partition = (list(more) + [None, None])[:2]
            extra = {k: v for k, v in (("timestamp", stamp), ("partition", partition)) if v is not None}
            while True:
                try:
                    producer.produce(topic, value=value, key=key, on_delivery=on_delivery, **extra)
                    break
                except BufferError:
                    producer.poll(0.1)  # local queue full: let deliveries drain
            count += 1
            producer.poll(0)
        remaining = producer.flush(timeout)
        if remaining:
            producer.purge(in_queue=True)  # what never left is not sent later, behind the back of a caller told it failed
            producer.flush(0)
            raise KafkaOperationError(f"{remaining} message(s) to {topic} not acknowledged within {timeout:.0f}s")
        if errors:
            raise KafkaOperationError(f"{len(errors)} message(s) to {topic} failed, first: {errors[0]}")
    return count


@dataclass
class _Kept:
    producer: Producer
    pid: int  # a forked child makes its own: librdkafka's threads do not survive a fork
    lock: threading.Lock = field(default_factory=threading.Lock)


_kept: dict[ClientConfig, _Kept] = {}
_LOG = logging.getLogger("adaptloop.kafka.producer")
_kept_guard = threading.Lock()
_inherited: list[_Kept] = []


@contextmanager
def kept_producer(client: ClientConfig, timeout: float = 60.0) -> Iterator[Producer]:
    """The process's idempotent producer for `client`, made on first use and kept, lent to one caller at a time
    (so a caller's flush and purge touch only its own messages); dropped when the caller fails with it.

    A new idempotent producer waits about half a second before its first
    send is acknowledged (flush: 0.51 s against 0.01 s without idempotence,
    on the local broker): librdkafka asks for a producer id before the broker
    connection is up and tries again 500 ms later. Every API command and CLI
    publish paid that before.
    """
    with _kept_guard:
        kept = _kept.get(client)
        if kept is not None and kept.pid != os.getpid():
            # A forked child: never destroy the parent's client here, that hangs or aborts (librdkafka #2374, #1674).
            _inherited.append(kept)
            kept = None
        if kept is None:
            # murmur2_random is Kafka's default partitioner (Java, aiokafka): the worker
            # then finds every user's events in the user's home partition.
            settings = {"enable.idempotence": True, "linger.ms": 5, "partitioner": "murmur2_random"}
            # Its log goes through Python logging, served by its own calls: a kept producer whose broker went
            # away says nothing until it is used again (librdkafka writes to stderr from its threads otherwise).
            producer = Producer(client.librdkafka_producer(**settings), logger=_LOG)
            kept = _kept[client] = _Kept(producer, os.getpid())
    if not kept.lock.acquire(timeout=timeout):
        raise KafkaOperationError(f"the producer stayed busy with another send for {timeout:.0f}s")
    try:
        yield kept.producer
    except BaseException:
        with _kept_guard:
            if _kept.get(client) is kept:
                del _kept[client]  # whatever state a failure left it in, the next send starts afresh
        raise
    finally:
        kept.lock.release()


@dataclass(frozen=True)
class OffsetRange:
    """Offsets [start, end) of one partition; empty when start == end."""

    topic: str
    partition: int
    start: int
    end: int

    @property
    def count(self) -> int:
        return self.end - self.start


def offset_ranges(
    client: ClientConfig,
    topics: list[str],
    since_ms: int = 0,
    until_ms: int | None = None,
    timeout: float = 60.0,
    missing_ok: bool = False,
) -> list[OffsetRange]:
    """For every partition of `topics`: the offsets of the records with broker timestamps in [since_ms, until_ms).

    offsets_for_times gives the first offset at or after a time; a missing
    `until_ms` means the end of the partition as of now. A topic that does
    not exist is an error, or holds nothing with `missing_ok`.
    """
    from confluent_kafka import TopicPartition

    consumer = Consumer(client.librdkafka(**{"group.id": "adaptloop-planner", "enable.auto.commit": False}))
    try:
        metadata = consumer.list_topics(timeout=timeout)
        partitions: list[tuple[str, int]] = []
        for topic in topics:
            if topic not in metadata.topics or metadata.topics[topic].error is not None:
                if missing_ok:
                    continue
                raise KafkaOperationError(f"topic {topic} does not exist")
            partitions += [(topic, p) for p in sorted(metadata.topics[topic].partitions)]
        if not partitions:
            return []

        def first_at(ms: int) -> list[int]:
            found = consumer.offsets_for_times([TopicPartition(t, p, ms) for t, p in partitions], timeout=timeout)
            return [tp.offset for tp in found]

        highs = [consumer.get_watermark_offsets(TopicPartition(t, p), timeout=timeout)[1] for t, p in partitions]
        starts = first_at(since_ms)
        ends = first_at(until_ms) if until_ms is not None else highs
        ranges = []
        for (topic, partition), start, end, high in zip(partitions, starts, ends, highs):
            end = high if end < 0 else end  # -1: nothing at or after that time
            start = end if start < 0 else min(start, end)
            ranges.append(OffsetRange(topic, partition, start, end))
        return ranges
    except KafkaException as exc:
        raise KafkaOperationError(f"planning offsets of {topics} failed: {exc}") from None
    finally:
        consumer.close()


def read_ranges(client: ClientConfig, ranges: list[OffsetRange], timeout: float = 60.0) -> Iterator[Record]:
    """Every record in `ranges` that still exists, per partition in offset order; no consumer group, nothing committed.

    Records can go between planning and reading (retention, compaction, a
    forget's delete-records): a start no longer there reads from the log's
    new start, and a partition's end reached (its EOF) completes its range,
    whether or not the range's last offsets still hold records.
    """
    from confluent_kafka import TopicPartition

    ends = {(r.topic, r.partition): r.end for r in ranges if r.count > 0}
    if not ends:
        return
    settings = {
        "group.id": "adaptloop-reader",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
    }
    consumer = Consumer(client.librdkafka(**settings))
    try:
        consumer.assign([TopicPartition(r.topic, r.partition, r.start) for r in ranges if r.count > 0])
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and _range_read(msg, ends):
                continue
            msg = _checked(msg, "reading offset ranges")
            if msg is None:
                continue
            record = Record.of(msg)
            key = (record.topic, record.partition)
            if key not in ends or record.offset >= ends[key]:
                continue
            deadline = time.monotonic() + timeout
            yield record
            if record.offset + 1 >= ends[key]:
                del ends[key]
        if ends:
            raise KafkaOperationError(f"timed out reading {sorted(ends)}")
    finally:
        consumer.close()


def _range_read(msg: Message, ends: dict[tuple[str, int], int]) -> bool:
    """Whether `msg` is a partition's end (EOF); one at or past its range's end completes that range (`ends`):
    whatever the range held and the partition no longer does is gone."""
    error = msg.error()
    if error is None or error.code() != KafkaError._PARTITION_EOF:
        return False
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is not None and partition is not None and offset is not None and offset >= ends.get((topic, partition), offset + 1):
        del ends[(topic, partition)]
    return True


def read_since(
    client: ClientConfig, topics: list[str], since_ms: int = 0, timeout: float = 60.0, missing_ok: bool = False
) -> Iterator[Record]:
    """Every record of `topics` from `since_ms` (broker timestamp) up to the end as of now.

    Uses offsets_for_times and assign(): no consumer group, nothing committed,
    the live groups are untouched. `missing_ok`: a topic that does not exist (yet) holds nothing.
    """
    yield from read_ranges(client, offset_ranges(client, topics, since_ms, timeout=timeout, missing_ok=missing_ok), timeout)
