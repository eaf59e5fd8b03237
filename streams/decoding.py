"""From a raw source message to (user key, Envelope), and where a user's state lives.

Every failure is an `InvalidMessage` whose reason goes to the dead-letter
topic as it is. Shared by the Faust agent and `adaptloop replay`.
"""

from __future__ import annotations

import functools

from aiokafka.partitioner import murmur2

from schemas import COMMAND_ADAPTER, LifecycleEvent
from schemas.decode import decode
from schemas.events import EVENT_TYPE_BY_INPUT_KIND
from streams.envelope import Envelope


@functools.lru_cache(maxsize=1 << 16)  # aiokafka's murmur2 is pure Python; a batch asks for each user's several times
def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2: Java clients, aiokafka, Faust) gives `key`."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


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
            # The provenance as a dict: validated inside the envelope's validation, not as a second model from Python.
            prov = {"topic": topic, "partition": partition, "offset": offset}
            return event.user_id.encode(), Envelope(k="event", kind=kind, prov=prov, parsed=event)
        if topic == self.commands_topic:
            command = decode(COMMAND_ADAPTER, raw, self.max_event_bytes)
            body = command.model_dump(mode="json")
            return command.user_id.encode(), Envelope(k="command", body=body, at=command.requested_at.timestamp())
        lifecycle = decode(LifecycleEvent, raw, self.max_event_bytes)
        return lifecycle.user_id.encode(), Envelope(k="lifecycle", body=lifecycle.model_dump(mode="json"))
