"""Consumer lag per group and topic, from the real broker."""

from __future__ import annotations

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry, generate_latest

from core.kafka.io import produce
from core.kafka.lag import ConsumerLagCollector, group_lag

pytestmark = pytest.mark.kafka


def test_lag_is_the_end_minus_the_committed_offset_summed_per_topic(kafka_client, topic_factory, group_factory):
    topic, other = topic_factory("lag", partitions=2), topic_factory("lag2")
    for partition, count in ((0, 4), (1, 6)):
        produce(kafka_client, topic, [(None, b"x", None, partition)] * count)
    produce(kafka_client, other, [(None, b"y")] * 3)
    group, idle = group_factory("lag"), group_factory("idle")
    consumer = Consumer(kafka_client.librdkafka(**{"group.id": group}))
    consumer.commit(offsets=[TopicPartition(topic, 0, 1), TopicPartition(topic, 1, 2)], asynchronous=False)
    consumer.close()

    admin = AdminClient(kafka_client.librdkafka())
    assert group_lag(admin, group, [topic, other]) == {topic: 3 + 4, other: 3}
    assert group_lag(admin, idle, [topic, "no.such.topic"]) == {topic: 10}, "nothing committed: all of it"

    registry = CollectorRegistry()
    registry.register(ConsumerLagCollector(kafka_client, {group: [topic], idle: [topic]}))
    text = generate_latest(registry).decode()
    assert f'adaptloop_consumer_lag_messages{{group="{group}",topic="{topic}"}} 7.0' in text
    assert f'adaptloop_consumer_lag_messages{{group="{idle}",topic="{topic}"}} 10.0' in text
    assert "adaptloop_consumer_lag_errors_total 0.0" in text


@pytest.mark.unit
def test_an_unreachable_broker_leaves_the_lag_out_and_counts_the_error():
    from core.kafka.broker import free_port
    from core.kafka.client import ClientConfig

    collector = ConsumerLagCollector(ClientConfig(bootstrap_servers=f"127.0.0.1:{free_port()}"), {"g": ["t"]}, timeout_s=1)
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert "adaptloop_consumer_lag_messages{" not in text and "adaptloop_consumer_lag_errors_total 1.0" in text
