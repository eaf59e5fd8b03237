"""Send a command on `adapter.commands` and wait for its outcome on `adapter.lifecycle`.

    event = send_command(client, commands_topic, lifecycle_topic, RollbackCommand(...), timeout=120)

The lifecycle topic is read from its end as of just before the command is
sent (assign(), no consumer group), so only answers to this command count:
the first event whose `job_id` is the command's id and whose type ends the
command (`schemas.lifecycle.ENDS_COMMAND`). None when nothing came within the timeout.
"""

from __future__ import annotations

import time

from confluent_kafka import Consumer, TopicPartition

from core.errors import InvalidMessage, KafkaOperationError
from core.kafka.client import ClientConfig
from core.kafka.io import next_message, produce
from schemas import ENDS_COMMAND, ApproveCommand, DenyCommand, LifecycleEvent, RetrainCommand, RollbackCommand, ValidateCommand
from schemas.decode import decode


def send_command(
    client: ClientConfig,
    commands_topic: str,
    lifecycle_topic: str,
    command: RetrainCommand | ValidateCommand | RollbackCommand | ApproveCommand | DenyCommand,
    timeout: float = 120.0,
) -> LifecycleEvent | None:
    consumer = Consumer(client.librdkafka(**{"group.id": "adaptloop-command-waiter", "enable.auto.commit": False}))
    try:
        metadata = consumer.list_topics(lifecycle_topic, timeout=30)
        topic = metadata.topics.get(lifecycle_topic)
        if topic is None or topic.error is not None:
            raise KafkaOperationError(f"topic {lifecycle_topic} does not exist (run `adaptloop topics ensure`)")
        start = []
        for partition in topic.partitions:
            _low, high = consumer.get_watermark_offsets(TopicPartition(lifecycle_topic, partition), timeout=30)
            start.append(TopicPartition(lifecycle_topic, partition, high))
        consumer.assign(start)
        produce(client, commands_topic, [(command.user_id, command.to_bytes())])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = next_message(consumer, 0.5, f"reading {lifecycle_topic}")
            if msg is None:
                continue
            try:
                event = decode(LifecycleEvent, msg.value())
            except InvalidMessage:
                continue  # not ours to judge; the topic's producers are the trainers
            if event.job_id == command.command_id and event.type in ENDS_COMMAND[command.type]:
                return event
        return None
    finally:
        consumer.close()
