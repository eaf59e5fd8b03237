"""How a batch's outputs reach Kafka: grouped per topic partition, in phases, acknowledged before the offsets.

A crash may cut a batch's sends anywhere, so they go out in this order, each
phase acknowledged before the next: (1) new examples, dead letters, the
internal hop; (2) the users' states; (3) event-id marks, training requests,
rollback commands and the removal of examples a request took. What a crash
leaves is then repairable: examples beyond a lost state are rewritten when
the batch is processed again, and marks or a request lost after a state
landed are sent again by the next run (UserProcessor._repair_after_crash).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import pydantic_core

PHASE_FIRST, PHASE_STATE, PHASE_MARKS = 0, 1, 2


def table_value(value: Any) -> bytes:
    """A table value as its changelog's JSON (pydantic's encoder: 4x the standard library's on a user's state)."""
    return pydantic_core.to_json(value)


class Producer(Protocol):
    """What `BatchSender` needs of aiokafka's producer."""

    def create_batch(self) -> Any: ...
    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> Any: ...


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

    def __init__(self, producer: Any) -> None:
        """`producer`: an aiokafka producer, or a callable that returns it once it exists (Faust starts it late)."""
        self._producer = producer
        self._groups: dict[tuple[int, str, int], list[tuple[bytes | None, bytes | None]]] = {}
        self._last: asyncio.Future[int] | None = None  # the sends started last: the next ones wait for them

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes | None, phase: int = PHASE_FIRST) -> None:
        self._groups.setdefault((phase, topic, partition), []).append((key, value))

    def _ready_producer(self) -> Producer:
        return self._producer() if callable(self._producer) else self._producer

    def start(self) -> asyncio.Future[int]:
        """Send every message added so far, after the sends started before; done (the count) once acknowledged.

        The messages are taken now, so what is added next belongs to the next
        sends; those go out only once these are acknowledged (and fail with
        them), so a batch's phases never interleave with another batch's.
        """
        groups, self._groups = self._groups, {}
        self._last = asyncio.ensure_future(self._send_after(self._last, groups))
        return self._last

    async def flush(self) -> int:
        """Send every message, phase by phase: a phase goes out only once the one before is acknowledged."""
        return await self.start()

    async def _send_after(self, previous: asyncio.Future[int] | None, groups: dict) -> int:
        if previous is not None:
            await previous
        producer = self._ready_producer()
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
    """Table writes: applied to the local store at once, sent with the batch (`stage()`, then the sender's `flush()`).

    The partition is named explicitly: Faust would take it from the "current
    event", which in a batch spanning partitions may be another user's. Only
    the latest value per key within a batch is sent.
    """

    def __init__(self, sender: BatchSender | None) -> None:
        """`sender` None: the tables only (what `adaptloop replay` builds, to write them at the end)."""
        self.sender = sender
        self._pending: dict[tuple[str, bytes], tuple[str, int, bytes | None, int]] = {}

    def put(self, table, partition: int, key: bytes, value, phase: int = PHASE_FIRST) -> None:
        table.data[key] = value
        if self.sender is not None:
            self._pending[(table.name, key)] = (table.changelog_topic_name, partition, table_value(value), phase)

    def delete(self, table, partition: int, key: bytes, phase: int = PHASE_MARKS) -> None:
        table.data.pop(key, None)
        if self.sender is not None:
            self._pending[(table.name, key)] = (table.changelog_topic_name, partition, None, phase)

    def stage(self) -> None:
        """Hand the writes to the sender."""
        pending, self._pending = self._pending, {}
        for (_name, key), (topic, partition, value, phase) in pending.items():
            assert self.sender is not None
            self.sender.add(topic, partition, key, value, phase)
