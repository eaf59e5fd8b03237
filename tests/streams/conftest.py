"""Fixtures for the streams tests: real `adaptloop worker` processes on the real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import stop_processes, wait_until
from adaptloop.kafka.client import ClientConfig
from adaptloop.kafka.io import consume, produce
from streams.app import partition_of
from streams.processor import Envelope

INPUT_KINDS = ("intent_traces", "feedback", "conversations", "concept_gaps")
OTHER = ("commands", "training_requests", "lifecycle", "dlq")


@dataclass
class WorkerHandle:
    """A worker subprocess plus the names and helpers a test needs."""

    client: ClientConfig
    config_path: Path
    topics: dict[str, str]
    app_id: str
    storage_root: Path
    internal_partitions: int
    log_path: Path
    web_port: int = 0  # the worker's /metrics; 0: off
    procs: list[subprocess.Popen] = field(default_factory=list)

    # ---- process control -------------------------------------------------- #

    def start(self) -> "WorkerHandle":
        env = {k: v for k, v in os.environ.items()}
        env["KAFKA_BOOTSTRAP_SERVERS"] = self.client.bootstrap_servers
        before = self.log_path.read_text(errors="replace").count("Worker ready") if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "adaptloop.cli", "--config", str(self.config_path), "worker", "--web-port", str(self.web_port), "--loglevel", "info"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.config_path.parent,
        )  # fmt: skip
        log.close()
        self.procs.append(proc)
        self._wait_ready(proc, before)
        return self

    def _wait_ready(self, proc: subprocess.Popen, before: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"worker exited with {proc.returncode}:\n{self.log_tail()}")
            text = self.log_path.read_text(errors="replace")
            if text.count("Worker ready") > before:
                return
            time.sleep(0.3)
        raise AssertionError(f"worker not ready in {timeout}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the newest worker process."""
        proc = self.procs[-1]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        stop_processes(self.procs)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # ---- I/O ------------------------------------------------------------------ #

    def publish(self, events: list[tuple[str, dict]]) -> None:
        """Publish (input kind, event dict) pairs, in order per topic."""
        by_topic: dict[str, list] = {}
        for kind, event in events:
            by_topic.setdefault(self.topics[kind], []).append((event["user_id"], json.dumps(event).encode()))
        for topic, messages in by_topic.items():
            produce(self.client, topic, messages)

    def publish_raw(self, kind: str, messages: list[tuple[bytes | str | None, bytes]]) -> None:
        produce(self.client, self.topics[kind], messages)

    def send(self, kind: str, user_id: str, message) -> None:
        produce(self.client, self.topics[kind], [(user_id, message.to_bytes())])

    def tick(self, at: float) -> None:
        """What the nightly crontab sends: one tick per internal partition."""
        from confluent_kafka import Producer

        producer = Producer(self.client.librdkafka())
        body = Envelope(k="tick", at=at).model_dump_json(exclude_none=True).encode()
        for partition in range(self.internal_partitions):
            producer.produce(f"{self.app_id}-users", value=body, partition=partition)
        assert producer.flush(30) == 0

    def read(self, kind: str, idle: float = 3.0) -> list:
        group = f"test-read-{uuid.uuid4().hex[:8]}"
        return list(consume(self.client, [self.topics[kind]], group, idle_timeout=idle, total_timeout=60))

    def requests(self, idle: float = 3.0) -> list[dict]:
        return [json.loads(r.value) for r in self.read("training_requests", idle)]

    def states(self, idle: float = 3.0) -> dict[str, dict]:
        """Each user's latest state, read back from the table's changelog topic."""
        out: dict[str, dict] = {}
        group = f"test-states-{uuid.uuid4().hex[:8]}"
        for record in consume(self.client, [f"{self.app_id}-users-changelog"], group, idle_timeout=idle, total_timeout=60):
            if record.value is not None:
                out[record.key.decode()] = json.loads(record.value)
        return out

    def wait_for(self, predicate: Callable[[], object], timeout: float = 60, what: str = "condition"):
        return wait_until(predicate, timeout, what, interval=1.0, context=self.log_tail)


@pytest.fixture
def worker_factory(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., WorkerHandle]]:
    """`worker_factory(schedule="nightly", min_gap_events=3, triggers={...})` -> a started worker."""
    handles: list[WorkerHandle] = []

    def make(start: bool = True, internal_partitions: int = 3, streams: dict | None = None, bootstrap: str | None = None,
             **top) -> WorkerHandle:  # fmt: skip
        base = tmp_path_factory.mktemp("worker")
        suffix = uuid.uuid4().hex[:8]
        topics = {kind: f"it.{kind}.{suffix}" for kind in (*INPUT_KINDS, *OTHER)}
        app_id = f"it-worker-{suffix}"
        streams_cfg = {"app_id": app_id, "internal_partitions": internal_partitions, "batch_within_s": 0.2,
                       "triggers": {"cooldown_s": 0}}  # fmt: skip
        for key, value in (streams or {}).items():
            if isinstance(value, dict):
                streams_cfg.setdefault(key, {}).update(value)
            else:
                streams_cfg[key] = value
        config = {
            "storage_root": str(base / "store"),
            "topics": {kind: {"name": name, "partitions": 1 if kind == "dlq" else 3} for kind, name in topics.items()},
            "streams": streams_cfg,
            **top,
        }
        config_path = base / "adapter_retrain.yaml"
        config_path.write_text(yaml.safe_dump(config))
        handle = WorkerHandle(
            client=ClientConfig(bootstrap_servers=bootstrap or kafka_bootstrap),
            config_path=config_path,
            topics=topics,
            app_id=app_id,
            storage_root=base / "store",
            internal_partitions=internal_partitions,
            log_path=base / "worker.log",
        )
        handles.append(handle)
        return handle.start() if start else handle

    yield make
    for handle in handles:
        handle.stop()


def event(topic_kind: str, user: str, n: int, t0: float = 1_780_000_000.0, **fields) -> tuple[str, dict]:
    """A valid input event; `n` makes the event_id and the timestamp (t0 + n seconds)."""
    from datetime import datetime, timezone

    base = {"event_id": f"{user}-{topic_kind}-{n}", "user_id": user,
            "timestamp": datetime.fromtimestamp(t0 + n, timezone.utc).isoformat()}  # fmt: skip
    defaults = {
        "intent_traces": {"intent": "fact", "status": "missed", "query": f"Question {n}?", "resolution": f"Answer {n}."},
        "feedback": {"kind": "correction", "query": f"What is fact {n}?", "response": "Wrong.", "correction": f"Fact {n} is true."},
        "conversations": {"session_id": "s1", "question": f"Chat {n}?", "answer": f"Reply {n}."},
        "concept_gaps": {"concept": f"Concept{n}", "description": f"Concept{n} is a thing."},
    }[topic_kind]
    return topic_kind, base | defaults | fields


def ground_truth(events: list[tuple[str, dict]]) -> dict[str, Counter]:
    """Per user: events (first delivery of each event_id) and gaps by kind, computed without the worker."""
    from streams.curation import CurationConfig, curate
    from schemas.events import EVENT_TYPE_BY_INPUT_KIND

    truth: dict[str, Counter] = {}
    seen = set()
    for kind, data in events:
        if data["event_id"] in seen:
            continue
        seen.add(data["event_id"])
        gap = curate(EVENT_TYPE_BY_INPUT_KIND[kind].model_validate(data), None, CurationConfig()).gap
        counter = truth.setdefault(data["user_id"], Counter())
        counter["events"] += 1
        if gap:
            counter[gap] += 1
    return truth
