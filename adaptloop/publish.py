"""`adaptloop publish FILE.jsonl`: recorded events back onto their topics (backfill, tests).

    adaptloop publish archive.jsonl [--dry-run]

One JSON object per line, in either of two shapes:

    {"topic": "feedback", "key": "ana", "value": {...}, "timestamp_ms": 1767225600000}
        a record: `topic` is a topic name or a topic key of the config
        (feedback, intent_traces, conversations, concept_gaps, commands,
        lifecycle, ...); `value` is an object (sent as JSON) or a string (sent
        as is); `key` defaults to the value's user_id; `timestamp_ms` keeps the
        record's original time (what `adaptloop replay --from` selects on).
    {"event_type": "feedback", "event_id": ..., "user_id": ..., ...}
        a bare input event: `event_type` (an input kind, or its topic name)
        picks the topic and is dropped; the key is the user_id.

The whole file is checked before anything is sent, and a bad line is named
by its number, so a file is published whole or not at all. Events are not
validated here: the worker does that and dead-letters the bad ones with the
reason, as it does for every producer.

Old timestamps and retention: the broker deletes a record whose timestamp is
older than its topic's `retention.ms` at its next retention check (every few
minutes), however recently it was written. `retention_warnings` says so for
each topic before anything is sent; give such a backfill topic a longer
retention (or none, `retention.ms: "-1"`) first.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from core.errors import AdaptloopError
from core.kafka.client import ClientConfig
from core.kafka.io import produce


class PublishFileError(AdaptloopError):
    """A line of a publish file names no known topic or is not a JSON object."""


@dataclass(frozen=True)
class OutgoingRecord:
    topic: str
    key: bytes | None
    value: bytes
    timestamp_ms: int | None = None


def resolve_topic(name: str, topics: dict[str, str], where: str) -> str:
    """A topic key of the config (or a kind with dashes) or a topic name it knows."""
    if name in topics:
        return topics[name]
    if name.replace("-", "_") in topics:
        return topics[name.replace("-", "_")]
    if name in topics.values():
        return name
    raise PublishFileError(f"{where}: unknown topic or event type {name!r}; known: {', '.join(sorted(topics))}")


def parse_line(line: str, topics: dict[str, str], where: str) -> OutgoingRecord:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PublishFileError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(item, dict):
        raise PublishFileError(f"{where}: expected a JSON object, got {type(item).__name__}")
    if "topic" in item:
        value = item.get("value")
        if isinstance(value, str):
            raw = value.encode()
        elif value is None:
            raise PublishFileError(f"{where}: a record needs a value")
        else:
            raw = json.dumps(value, ensure_ascii=False).encode()
        key = item.get("key")
        if key is None and isinstance(value, dict) and isinstance(value.get("user_id"), str):
            key = value["user_id"]
        stamp = item.get("timestamp_ms")
        if stamp is not None and (not isinstance(stamp, int) or stamp < 0):
            raise PublishFileError(f"{where}: timestamp_ms must be a non-negative integer")
        return OutgoingRecord(
            resolve_topic(str(item["topic"]), topics, where), None if key is None else str(key).encode(), raw, stamp
        )
    if "event_type" in item:
        event = {k: v for k, v in item.items() if k != "event_type"}
        user = event.get("user_id")
        return OutgoingRecord(
            resolve_topic(str(item["event_type"]), topics, where),
            str(user).encode() if user is not None else None,
            json.dumps(event, ensure_ascii=False).encode(),
        )
    raise PublishFileError(f"{where}: a line needs a 'topic' (with a 'value') or an 'event_type'")


def read_publish_file(path: Path, topics: dict[str, str]) -> list[OutgoingRecord]:
    """Every record of the file, or a PublishFileError naming the first bad line."""
    records = []
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if line.strip():
                    records.append(parse_line(line, topics, f"{path}:{number}"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PublishFileError(f"cannot read {path}: {exc}") from None
    return records


def retention_warnings(client: ClientConfig, records: list[OutgoingRecord], now_ms: int | None = None) -> list[str]:
    """One line per topic whose records carry timestamps older than the topic's retention (the broker deletes them)."""
    oldest: dict[str, list[int]] = {}
    for record in records:
        if record.timestamp_ms is not None:
            oldest.setdefault(record.topic, []).append(record.timestamp_ms)
    if not oldest:
        return []
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    warnings = []
    for topic, retention_ms in topic_retention_ms(client, list(oldest)).items():
        expired = [t for t in oldest[topic] if retention_ms >= 0 and t < now_ms - retention_ms]
        if expired:
            warnings.append(
                f"{len(expired)} record(s) for {topic} have timestamps older than its retention.ms "
                f"({retention_ms / 86_400_000:.1f} days): the broker deletes them at its next retention check; "
                f"raise the topic's retention.ms (or set it to -1) before a backfill this old"
            )
    return warnings


def topic_retention_ms(client: ClientConfig, topics: list[str], timeout: float = 30.0) -> dict[str, int]:
    """Each existing topic's effective `retention.ms` (-1: kept forever); topics that do not exist are left out."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient(client.librdkafka())
    futures = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics], request_timeout=timeout)
    out = {}
    for resource, future in futures.items():
        try:
            entry = future.result(timeout)["retention.ms"]
        except (KafkaException, KeyError):
            continue  # a missing topic: publishing to it fails with its own clear error
        out[resource.name] = int(entry.value)
    return out


def publish(client: ClientConfig, records: Iterable[OutgoingRecord]) -> dict[str, int]:
    """Send the records, in file order per topic; return the count per topic."""
    by_topic: dict[str, list[tuple[bytes | None, bytes, int | None]]] = {}
    for record in records:
        by_topic.setdefault(record.topic, []).append((record.key, record.value, record.timestamp_ms))
    return {topic: produce(client, topic, messages) for topic, messages in by_topic.items()}
