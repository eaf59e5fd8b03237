"""Small, blocking produce/consume helpers over confluent-kafka.

Used by the CLI (`demo`, `publish`) and the tests; the long-running services
have their own loops.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

from adaptloop.errors import KafkaOperationError
from adaptloop.kafka.client import ClientConfig


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


def next_message(consumer: Consumer, timeout: float, what: str):
    """The next message, or None when nothing came (a partition's end counts as nothing); errors raise."""
    msg = consumer.poll(timeout)
    if msg is None:
        return None
    if msg.error():
        if msg.error().code() == KafkaError._PARTITION_EOF:
            return None
        raise KafkaOperationError(f"{what} failed: {msg.error()}")
    return msg


def produce(client: ClientConfig, topic: str, messages: Iterable[tuple[str | bytes | None, bytes]], timeout: float = 60.0) -> int:
    """Send (key, value) pairs to `topic`, wait for every acknowledgement; return the count."""
    # murmur2_random is Kafka's default partitioner (Java, aiokafka): the worker
    # then finds every user's events in the user's home partition.
    producer = Producer(client.librdkafka(**{"enable.idempotence": True, "linger.ms": 5, "partitioner": "murmur2_random"}))
    errors: list[str] = []

    def on_delivery(err, _msg) -> None:
        if err is not None:
            errors.append(str(err))

    count = 0
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.1)  # local queue full: let deliveries drain
        count += 1
        producer.poll(0)
    remaining = producer.flush(timeout)
    if remaining:
        raise KafkaOperationError(f"{remaining} message(s) to {topic} not acknowledged within {timeout:.0f}s")
    if errors:
        raise KafkaOperationError(f"{len(errors)} message(s) to {topic} failed, first: {errors[0]}")
    return count


def consume(
    client: ClientConfig,
    topics: list[str],
    group_id: str,
    *,
    max_messages: int | None = None,
    idle_timeout: float = 5.0,
    total_timeout: float = 120.0,
    from_beginning: bool = True,
) -> Iterator[Record]:
    """Yield records until `max_messages` arrived, or nothing came for `idle_timeout` seconds."""
    consumer = Consumer(
        client.librdkafka(
            **{
                "group.id": group_id,
                "auto.offset.reset": "earliest" if from_beginning else "latest",
                "enable.auto.commit": True,
                "partition.assignment.strategy": "cooperative-sticky",
            }
        )
    )
    try:
        consumer.subscribe(topics)
        seen = 0
        deadline = time.monotonic() + total_timeout
        last = time.monotonic()
        while time.monotonic() < deadline and (max_messages is None or seen < max_messages):
            msg = next_message(consumer, 0.5, f"consuming {topics}")
            if msg is None:
                if time.monotonic() - last > idle_timeout:
                    break
                continue
            last = time.monotonic()
            seen += 1
            yield Record(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), msg.timestamp()[1])
    except KafkaException as exc:
        raise KafkaOperationError(f"consuming {topics} failed: {exc}") from None
    finally:
        consumer.close()


def read_since(client: ClientConfig, topics: list[str], since_ms: int = 0, timeout: float = 60.0) -> Iterator[Record]:
    """Every record of `topics` from `since_ms` (broker timestamp) up to the end as of now.

    Uses offsets_for_times and assign(): no consumer group, nothing committed,
    the live groups are untouched.
    """
    from confluent_kafka import TopicPartition

    consumer = Consumer(client.librdkafka(**{"group.id": "adaptloop-reader", "enable.auto.commit": False}))
    try:
        metadata = consumer.list_topics(timeout=timeout)
        wanted: list[TopicPartition] = []
        for topic in topics:
            if topic not in metadata.topics or metadata.topics[topic].error is not None:
                raise KafkaOperationError(f"topic {topic} does not exist")
            wanted += [TopicPartition(topic, p, since_ms) for p in metadata.topics[topic].partitions]
        starts = consumer.offsets_for_times(wanted, timeout=timeout)
        ends: dict[tuple[str, int], int] = {}
        assignment = []
        for tp in starts:
            _low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=timeout)
            start = tp.offset if tp.offset >= 0 else high  # -1: nothing at or after since_ms
            if start < high:
                ends[(tp.topic, tp.partition)] = high
                assignment.append(TopicPartition(tp.topic, tp.partition, start))
        if not assignment:
            return
        consumer.assign(assignment)
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            msg = next_message(consumer, 0.5, f"reading {topics}")
            if msg is None:
                continue
            key = (msg.topic(), msg.partition())
            if key not in ends:
                continue
            deadline = time.monotonic() + timeout
            yield Record(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), msg.timestamp()[1])
            if msg.offset() + 1 >= ends[key]:
                del ends[key]
        if ends:
            raise KafkaOperationError(f"timed out reading {sorted(ends)}")
    finally:
        consumer.close()
