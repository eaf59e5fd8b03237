"""streams/sending.py against the real broker: a batch's outputs, phase by phase, whole and in order."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer

from streams.app import faust_app
from streams.config import PRODUCER_MAX_BATCH_BYTES, WorkerConfig
from streams.sending import PHASE_FIRST, PHASE_MARKS, PHASE_STATE, BatchSender
from tests.support.kafka import read_topic

pytestmark = pytest.mark.kafka

BROKER_RECORD_BATCH_LIMIT = 1_048_588  # the broker's default message.max.bytes


def _send(bootstrap: str, fill, batch_bytes: int = PRODUCER_MAX_BATCH_BYTES) -> int:
    async def run() -> int:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=-1, max_batch_size=batch_bytes)
        await producer.start()
        try:
            sender = BatchSender(producer)
            fill(sender)
            return await sender.flush()
        finally:
            await producer.stop()

    return asyncio.run(run())


def test_a_phase_larger_than_one_producer_batch_arrives_whole_and_in_order(kafka_client, topic_factory):
    examples, states = topic_factory("examples", partitions=2), topic_factory("states", partitions=2)
    padding = "x" * 400  # 3,000 records: more than one producer batch per partition

    def fill(sender: BatchSender) -> None:
        for i in range(3000):
            sender.add(examples, i % 2, b"user-%d" % (i % 2), b'{"seq": %d, "pad": "%s"}' % (i, padding.encode()))
        sender.add(states, 0, b"user-0", b'{"state": 1}', PHASE_STATE)
        sender.add(states, 1, b"user-1", b'{"marks": 1}', PHASE_MARKS)

    assert _send(kafka_client.bootstrap_servers, fill) == 3002
    records = read_topic(kafka_client, examples)
    assert len(records) == 3000
    for partition in (0, 1):
        seqs = [int(r.value.split(b",")[0].split(b":")[1]) for r in records if r.partition == partition]
        assert seqs == list(range(partition, 3000, 2)), "every record of the phase, in the order added"
    assert [r.value for r in read_topic(kafka_client, states)] == [b'{"state": 1}', b'{"marks": 1}']


def test_phases_are_acknowledged_in_order(kafka_client, topic_factory):
    topic = topic_factory("phases")

    def fill(sender: BatchSender) -> None:  # added last-phase first: the phase decides, not the order of adding
        sender.add(topic, 0, b"u", b"marks", PHASE_MARKS)
        sender.add(topic, 0, b"u", b"state", PHASE_STATE)
        sender.add(topic, 0, b"u", b"example", PHASE_FIRST)

    _send(kafka_client.bootstrap_servers, fill)
    assert [r.value for r in read_topic(kafka_client, topic)] == [b"example", b"state", b"marks"]


def test_the_worker_producer_batches_a_partition_s_records_of_a_send_phase_together(isolated_settings):
    """aiokafka holds one batch per partition until the one before is sent: 16 KiB batches cost round trips."""
    app = faust_app(WorkerConfig.from_settings(isolated_settings()))
    assert 256 * 1024 <= app.conf.producer_max_batch_size == PRODUCER_MAX_BATCH_BYTES < BROKER_RECORD_BATCH_LIMIT


def test_a_topic_whose_max_message_bytes_is_lower_gets_batches_it_accepts(kafka_client, topic_factory, isolated_settings):
    """A topic configured with a lower `max.message.bytes` than the worker's batch size refused its full batches."""
    limit = 64 * 1024
    settings = isolated_settings()
    dlq = settings.topics.dlq.model_copy(update={"config": {**settings.topics.dlq.config, "max.message.bytes": str(limit)}})
    cfg = WorkerConfig.from_settings(settings.model_copy(update={"topics": settings.topics.model_copy(update={"dlq": dlq})}))
    assert cfg.producer_batch_bytes < limit and faust_app(cfg).conf.producer_max_batch_size == cfg.producer_batch_bytes
    small = topic_factory("small-messages", config={"max.message.bytes": str(limit)})

    def fill(sender: BatchSender) -> None:
        for i in range(2000):  # about 460 KB: several batches at the topic's limit, one at the default size
            sender.add(small, 0, b"u", b'{"seq": %d, "pad": "%s"}' % (i, b"x" * 200))

    assert _send(kafka_client.bootstrap_servers, fill, cfg.producer_batch_bytes) == 2000
    assert len(read_topic(kafka_client, small)) == 2000
