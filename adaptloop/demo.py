"""`adaptloop demo` (`make demo`): the main job on the embedded defaults.

    make demo            # or: adaptloop demo

Starts the local broker (unless KAFKA_BOOTSTRAP_SERVERS is set), ensures the
topics, publishes a scripted stream of interactions (with a few malformed
messages among them), reads it back through a consumer group, validates every
message with the schemas and shows what arrived; bad messages are dead-lettered
with their reason. Exits non-zero if any step fails.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections import Counter

import click

from adaptloop.errors import AdaptloopError, InvalidMessage
from adaptloop.kafka.client import ClientConfig
from adaptloop.kafka.io import consume, produce
from adaptloop.kafka.topics import ensure_topics, plans_from_specs
from adaptloop.samples import malformed_messages, sample_events
from adaptloop.settings import Settings
from schemas import DeadLetter
from schemas.decode import decode
from schemas.events import EVENT_TYPE_BY_INPUT_KIND


def _step(text: str) -> None:
    click.secho(f"==> {text}", bold=True)


def run_demo(settings: Settings, local_broker=None) -> None:
    started = time.monotonic()
    if local_broker is not None:
        _step(f"starting the local Kafka broker on port {local_broker.port}")
        bootstrap = local_broker.up()
        client = ClientConfig.from_settings(settings.kafka.model_copy(update={"bootstrap_servers": bootstrap}))
    else:
        client = ClientConfig.from_settings(settings.kafka)
        _step(f"using the Kafka cluster at {client.bootstrap_servers}")

    _step("ensuring topics")
    for outcome in ensure_topics(client, plans_from_specs(settings.topics.all())):
        click.echo(f"    {'created' if outcome.created else 'exists '} {outcome.name}")

    run = uuid.uuid4().hex[:6]
    users = [f"demo-alice-{run}", f"demo-bob-{run}"]
    events = sample_events(users, per_user=12, seed=1)
    inputs = settings.topics.inputs()
    _step(f"publishing {len(events)} events for {', '.join(users)} and {len(malformed_messages())} malformed messages")
    by_topic: dict[str, list[tuple[str, bytes]]] = {}
    for kind, event in events:
        by_topic.setdefault(inputs[kind].name, []).append((event["user_id"], json.dumps(event).encode()))
    by_topic.setdefault(inputs["intent_traces"].name, []).extend((f"mallory-{run}", raw) for raw, _ in malformed_messages())
    for topic, messages in by_topic.items():
        produce(client, topic, messages)
        click.echo(f"    {len(messages):3d} -> {topic}")

    _step("consuming the input topics through a fresh consumer group and validating each message")
    kind_by_topic = {spec.name: kind for kind, spec in inputs.items()}
    mallory = f"mallory-{run}".encode()
    counts: Counter[tuple[str, str]] = Counter()
    dead: list[DeadLetter] = []
    ours_dead: list[DeadLetter] = []
    for record in consume(client, list(by_topic), f"adaptloop-demo-{run}", idle_timeout=15):
        model = EVENT_TYPE_BY_INPUT_KIND[kind_by_topic[record.topic]]
        try:
            event = decode(model, record.value, settings.kafka.max_event_bytes)
        except InvalidMessage as exc:
            dead.append(DeadLetter.of(topic=record.topic, partition=record.partition, offset=record.offset,
                                      key=record.key, value=record.value, reason=exc.reason))
        else:
            if event.user_id in users:
                counts[(event.user_id, model.__name__)] += 1
        ours_dead = [d for d in dead if d.key_b64 and base64.b64decode(d.key_b64) == mallory]
        if sum(counts.values()) == len(events) and len(ours_dead) == len(malformed_messages()):
            break
    if ours_dead:
        produce(client, settings.topics.dlq.name, [(d.source_topic, d.to_bytes()) for d in ours_dead])
    for (user, kind), n in sorted(counts.items()):
        click.echo(f"    {user:<20} {kind:<18} {n}")
    for letter in ours_dead:
        click.echo(f"    dead letter {letter.source_topic}@{letter.partition}:{letter.offset}: {letter.reason[:90]}")

    got = sum(counts.values())
    if got != len(events) or len(ours_dead) != len(malformed_messages()):
        raise AdaptloopError(
            f"demo failed: {got}/{len(events)} events valid, {len(ours_dead)}/{len(malformed_messages())} dead-lettered"
        )
    _step(f"done in {time.monotonic() - started:.1f}s: {got} events consumed, {len(ours_dead)} malformed messages dead-lettered")
