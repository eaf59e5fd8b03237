"""A live `adaptloop api` process against the real broker, with tokens and a registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from adaptloop.kafka.broker import free_port
from adaptloop.kafka.client import ClientConfig
from adaptloop.kafka.io import consume, produce
from api.auth import TokenStore
from tests.conftest import stop_processes, wait_until

TOPICS = ("intent_traces", "feedback", "conversations", "concept_gaps", "commands", "training_requests", "lifecycle", "dlq")


@dataclass
class ApiHandle:
    url: str
    client: ClientConfig
    topics: dict[str, str]
    store: Path
    config: Path
    tokens: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def headers(self, who: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def commands(self) -> list[dict]:
        records = consume(self.client, [self.topics["commands"]], f"read-{uuid.uuid4().hex[:6]}", idle_timeout=2, total_timeout=30)
        return [json.loads(r.value) for r in records]

    def lifecycle(self, **event) -> None:
        """Publish a lifecycle event as a trainer would."""
        from schemas import LifecycleEvent

        message = LifecycleEvent(event_id=f"ev-{uuid.uuid4().hex[:8]}", **event)
        produce(self.client, self.topics["lifecycle"], [(message.user_id, message.to_bytes())])

    def wait_for(self, predicate, timeout: float = 60, what: str = "condition"):
        return wait_until(predicate, timeout, what, interval=0.3)


def write_config(base: Path, topics: dict[str, str], **extra) -> Path:
    config = base / "adapter_retrain.yaml"
    config.write_text(yaml.safe_dump({
        "storage_root": str(base / "store"),
        "topics": {k: {"name": v, "partitions": 1 if k == "dlq" else 3} for k, v in topics.items()},
        "streams": {"internal_partitions": 3, "app_id": f"app-{uuid.uuid4().hex[:6]}"},
        **extra,
    }))  # fmt: skip
    return config


def start_api(config: Path, bootstrap: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=bootstrap)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "adaptloop.cli", "--config", str(config), "api", "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"api exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).json().get("lifecycle_caught_up"):
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"api not ready: {log_path.read_text()[-2000:]}")


@pytest.fixture
def api_server(kafka_bootstrap, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    topics = {k: f"api.{k}.{suffix}" for k in TOPICS}
    config = write_config(tmp_path, topics)
    store = tmp_path / "store"
    tokens = TokenStore(store / "api" / "tokens.json")
    handle = ApiHandle("", ClientConfig(bootstrap_servers=kafka_bootstrap), topics, store, config)
    handle.tokens = {"admin": tokens.create(["admin"])[1], "alice": tokens.create(["user:alice"])[1]}
    proc, handle.url = start_api(config, kafka_bootstrap, tmp_path / "api.log")
    handle.procs.append(proc)
    yield handle
    stop_processes(handle.procs)
