"""Reading topics back in tests: everything there is now, never a partial read."""

from __future__ import annotations

from core.kafka.client import ClientConfig
from core.kafka.io import Record, read_since


def read_topic(client: ClientConfig, topics: list[str] | str, timeout: float = 60.0) -> list[Record]:
    """Every record of `topics` as of now, per partition in offset order.

    The end offsets are captured first and read up to exactly (no consumer
    group, nothing committed), so a slow group join or a quiet moment can
    never cut the read short: what is not there yet is not there, and a test
    that expects more waits for it with `wait_until`.
    """
    return list(read_since(client, [topics] if isinstance(topics, str) else list(topics), 0, timeout))


def partitions_per_member(client: ClientConfig, group_id: str, topic: str) -> list[int]:
    """How many of `topic`'s partitions each member of `group_id` holds now, sorted ([] while the group is empty)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(client.librdkafka())
    (description,) = [f.result(timeout=30) for f in admin.describe_consumer_groups([group_id]).values()]
    return sorted(sum(1 for tp in m.assignment.topic_partitions if tp.topic == topic) for m in description.members)
