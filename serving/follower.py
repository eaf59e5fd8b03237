"""The lifecycle topic, followed by `adaptloop serve`: a promoted version is loaded before anyone asks for it.

What answers a user is read from the registry at every request, so a
promotion or rollback counts from the next request on whether or not it was
announced. Following `adapter.lifecycle` (from its end, no consumer group)
lets the server load a promoted version ahead of its first request, drop a
user's versions that are no longer active (or a forgotten user's, by salted hash), and it counts the swaps.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, TopicPartition

from core.kafka.client import ClientConfig

log = logging.getLogger("adaptloop.serving")

SWAPS = ("promoted", "rolled_back", "forgotten")  # forgotten: `user_id` is the salted hash


class LifecycleFollower:
    """Calls `on_swap(user_id, version | None, event)` for every promotion and rollback published from now on."""

    def __init__(
        self,
        client: ClientConfig,
        topic: str,
        on_swap: Callable[[str, int | None, dict], None],
        on_positioned: Callable[[], None] | None = None,
    ) -> None:
        self.client, self.topic, self.on_swap = client, topic, on_swap
        # Called each time the follower (re)positions at the topic's end: what was announced while it
        # was away (a broker outage) is not replayed, so the caller re-reads the registry instead.
        self.on_positioned = on_positioned
        self.stop = threading.Event()
        self.ready = threading.Event()  # positioned at the topic's end
        self.thread = threading.Thread(target=self._run, name="lifecycle-follower", daemon=True)

    def start(self) -> LifecycleFollower:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self._follow()
            except Exception as exc:  # the broker went away: requests still read the registry; say so, retry
                log.warning("lifecycle follower: %s; retrying in 2 s", exc)
                time.sleep(2)

    def _follow(self) -> None:
        consumer = Consumer(self.client.librdkafka(**{"group.id": "adaptloop-serve-follower", "enable.auto.commit": False}))
        try:
            metadata = consumer.list_topics(self.topic, timeout=10)
            partitions = metadata.topics[self.topic].partitions if self.topic in metadata.topics else {}
            if not partitions:
                raise RuntimeError(f"topic {self.topic} does not exist yet")
            ends = [
                TopicPartition(self.topic, p, consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)[1])
                for p in partitions
            ]
            consumer.assign(ends)
            if self.on_positioned is not None:
                self.on_positioned()
            self.ready.set()
            while not self.stop.is_set():
                msg = consumer.poll(0.2)
                if msg is None or (msg.error() and msg.error().code() == KafkaError._PARTITION_EOF):
                    continue
                if msg.error():
                    raise RuntimeError(str(msg.error()))
                self._apply(msg.value())
        finally:
            consumer.close()

    def _apply(self, value: bytes | None) -> None:
        try:
            event = json.loads(value or b"null")
        except ValueError:
            return
        if isinstance(event, dict) and event.get("type") in SWAPS and isinstance(event.get("user_id"), str):
            try:
                self.on_swap(event["user_id"], event.get("version"), event)
            except Exception:  # a preload that fails is the next request's to report
                log.exception("after %s of %s", event["type"], event["user_id"])
