"""`adaptloop demo` (`make demo`): the main job on the embedded defaults.

    make demo            # or: adaptloop demo

Starts the local broker (unless KAFKA_BOOTSTRAP_SERVERS is set), ensures the
topics, starts a streams worker, publishes a scripted stream of interactions
for two users (with malformed messages among them) and shows what the worker
makes of it: the dead letters with their reasons, and the training requests
with their datasets, as they arrive. Exits non-zero if any step fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import click

from adaptloop.errors import AdaptloopError
from adaptloop.kafka.client import ClientConfig
from adaptloop.kafka.io import consume, produce
from adaptloop.kafka.topics import ensure_topics, plans_from_specs
from adaptloop.samples import malformed_messages, sample_events
from adaptloop.settings import Settings, write_settings


def _step(text: str) -> None:
    click.secho(f"==> {text}", bold=True)


def run_demo(settings: Settings, local_broker=None, timeout_s: float = 180.0) -> None:
    started = time.monotonic()
    if local_broker is not None:
        _step(f"starting the local Kafka broker on port {local_broker.port}")
        bootstrap = local_broker.up()
        settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"bootstrap_servers": bootstrap})})
    client = ClientConfig.from_settings(settings.kafka)
    _step(f"Kafka at {client.bootstrap_servers}; ensuring topics")
    for outcome in ensure_topics(client, plans_from_specs(settings.topics.all())):
        click.echo(f"    {'created' if outcome.created else 'exists '} {outcome.name}")

    run = uuid.uuid4().hex[:6]
    workdir = Path(tempfile.mkdtemp(prefix="adaptloop-demo-"))
    config_path = write_settings(settings, workdir / "settings.yaml")
    _step(f"starting a streams worker (log: {workdir / 'worker.log'})")
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=client.bootstrap_servers)
    with open(workdir / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "adaptloop.cli", "--config", str(config_path), "worker", "--web-port", "0"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        _run(settings, client, run, workdir, worker, timeout_s)
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
    _step(f"done in {time.monotonic() - started:.1f}s")


def _run(settings: Settings, client: ClientConfig, run: str, workdir: Path, worker: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while "Worker ready" not in (workdir / "worker.log").read_text(errors="replace"):
        if worker.poll() is not None or time.monotonic() > deadline:
            raise AdaptloopError(f"the worker did not start; see {workdir / 'worker.log'}")
        time.sleep(0.3)

    users = [f"demo-alice-{run}", f"demo-bob-{run}"]
    events = sample_events(users, per_user=12, seed=1)
    bad = malformed_messages()
    inputs = settings.topics.inputs()
    _step(f"publishing {len(events)} events for {', '.join(users)} and {len(bad)} malformed messages")
    by_topic: dict[str, list[tuple[str, bytes]]] = {}
    for kind, event in events:
        by_topic.setdefault(inputs[kind].name, []).append((event["user_id"], json.dumps(event).encode()))
    by_topic[inputs["intent_traces"].name] += [(f"mallory-{run}", raw) for raw, _ in bad]
    for topic, messages in by_topic.items():
        produce(client, topic, messages)
        click.echo(f"    {len(messages):3d} -> {topic}")

    _step("waiting for the worker: dead letters and training requests")
    letters: list[dict] = []
    requests: dict[str, dict] = {}
    group = f"adaptloop-demo-{run}"
    topics = [settings.topics.dlq.name, settings.topics.training_requests.name]
    for record in consume(client, topics, group, idle_timeout=timeout_s, total_timeout=timeout_s):
        value = json.loads(record.value)
        if record.topic == settings.topics.dlq.name and record.key == f"mallory-{run}".encode():
            letters.append(value)
            click.echo(f"    dead letter {value['source_topic']}@{value['partition']}:{value['offset']}: {value['reason'][:80]}")
        elif record.topic == settings.topics.training_requests.name and value["user_id"] in users:
            requests[value["user_id"]] = value
            ds = value["dataset"]
            click.echo(f"    training request for {value['user_id']} ({value['trigger']}): {ds['example_counts']}, "
                       f"{ds['test_count']} held out\n      dataset {ds['uri']}")  # fmt: skip
        if len(letters) == len(bad) and len(requests) == len(users):
            break
    if len(letters) != len(bad) or len(requests) != len(users):
        raise AdaptloopError(
            f"demo failed: {len(letters)}/{len(bad)} dead letters, {len(requests)}/{len(users)} training requests; "
            f"see {workdir / 'worker.log'}"
        )
    _step(f"{len(events)} events curated, {len(letters)} malformed messages dead-lettered, {len(requests)} training requests emitted")
