"""Live `adaptloop worker`, `trainer`, `api` and `serve` processes (and the whole loop), with the helpers their tests use.

All stand on `Service` (tests/support/processes.py): started with a
config of the test's own (uniquely named topics, groups and stores), waited
for until ready, stopped by their fixtures.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import yaml

from core.kafka.broker import free_port
from core.kafka.client import ClientConfig
from core.kafka.io import produce
from core.settings import changelog_topic, worker_internal_topic
from core.storage import ArtifactStore
from schemas import LifecycleEvent, TrainingRequest
from schemas.training import TrainingExample, request_id_for
from streams.dataset import write_dataset
from streams.envelope import Envelope
from tests.support.events import TOPIC_KEYS
from tests.support.kafka import read_topic
from tests.support.processes import Service, log_says, wait_until


@contextmanager
def handle_factory(build: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """`make(start=True, **kwargs)`: a handle built by `build(**kwargs)`, started unless asked not to; all stopped at the end."""
    handles: list[Any] = []

    def make(start: bool = True, **kwargs):
        handle = build(**kwargs)
        handles.append(handle)
        return handle.start() if start else handle

    try:
        yield make
    finally:
        for handle in handles:
            handle.stop()


def unique_topics(prefix: str) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return {key: f"{prefix}.{key}.{suffix}" for key in TOPIC_KEYS}


def topic_config(topics: dict[str, str], partitions: int = 3) -> dict:
    return {key: {"name": name, "partitions": 1 if key == "dlq" else partitions} for key, name in topics.items()}


# ---- the worker ---------------------------------------------------------------------- #


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
    service: Service = field(init=False)

    def __post_init__(self) -> None:
        args = ("worker", "--web-port", str(self.web_port), "--loglevel", "info")
        self.service = Service(self.config_path, args, self.log_path, log_says("Worker ready"), self.client.bootstrap_servers)

    @property
    def procs(self):
        return self.service.procs

    def start(self) -> WorkerHandle:
        self.service.start(timeout=90)
        return self

    def kill(self) -> None:
        self.service.kill()

    def stop(self) -> None:
        self.service.stop()

    def log_tail(self, lines: int = 40) -> str:
        return self.service.log_tail(lines)

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
        body = Envelope(k="tick", at=at).model_dump_json(exclude_none=True).encode()
        produce(self.client, worker_internal_topic(self.app_id), [(None, body, None, p) for p in range(self.internal_partitions)])

    def read(self, kind: str) -> list:
        return read_topic(self.client, self.topics[kind])

    def requests(self) -> list[dict]:
        return [json.loads(r.value) for r in self.read("training_requests")]

    def states(self) -> dict[str, dict]:
        """Each user's latest state, read back from the table's changelog topic."""
        out: dict[str, dict] = {}
        for record in read_topic(self.client, changelog_topic(self.app_id, "users")):
            if record.value is not None:
                out[record.key.decode()] = json.loads(record.value)
        return out

    def counted(self, states: dict[str, dict] | None = None) -> int:
        """Events the users' states (`states`, else as their changelog says now) have counted."""
        return sum(s.get("events_total", 0) for s in (self.states() if states is None else states).values())

    def states_once_counted(self, events: int) -> dict[str, dict] | None:
        """The users' states once they have counted `events` events in all, else None (for `wait_for`)."""
        states = self.states()
        return states if self.counted(states) >= events else None

    def peer(self, log_path: Path, cache_dir: Path) -> WorkerHandle:
        """Another worker of the same app (config, consumer group, topics, tables), not started, with its own log
        and local files: a second member to share the partitions with."""
        other = replace(self, log_path=log_path)
        other.service.env["ADAPTLOOP_CACHE_DIR"] = str(cache_dir)
        return other

    def wait_for(self, predicate: Callable[[], object], timeout: float = 60, what: str = "condition"):
        return wait_until(predicate, timeout, what, interval=0.5, context=self.log_tail)


def make_worker(bootstrap: str, base: Path, internal_partitions: int = 3, streams: dict | None = None, **top) -> WorkerHandle:
    """A worker on topics of its own; `streams` and `top` override the settings (e.g. min_gap_events=3)."""
    topics = unique_topics("it")
    app_id = f"it-worker-{uuid.uuid4().hex[:8]}"
    streams_cfg: dict = {
        "app_id": app_id,
        "internal_partitions": internal_partitions,
        "batch_within_s": 0.2,
        "triggers": {"cooldown_s": 0},
    }
    for key, value in (streams or {}).items():
        if isinstance(value, dict):
            streams_cfg.setdefault(key, {}).update(value)
        else:
            streams_cfg[key] = value
    config = {"storage_root": str(base / "store"), "topics": topic_config(topics), "streams": streams_cfg, **top}
    config_path = base / "adapter_retrain.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return WorkerHandle(
        ClientConfig(bootstrap_servers=bootstrap),
        config_path,
        topics,
        app_id,
        base / "store",
        internal_partitions,
        base / "worker.log",
    )


# ---- the trainer --------------------------------------------------------------------- #


class TrainerHandle:
    def __init__(
        self, bootstrap: str, base: Path, tiny: Path, training: dict, request_partitions: int = 3, settings: dict | None = None
    ) -> None:
        self.group_id = f"tr-{uuid.uuid4().hex[:8]}"
        self.client = ClientConfig(bootstrap_servers=bootstrap)
        self.topics = unique_topics("tr")
        self.store = base / "store"
        self.config = base / "adapter_retrain.yaml"
        topics = topic_config(self.topics)
        topics["training_requests"]["partitions"] = request_partitions
        self.config.write_text(
            yaml.safe_dump(
                {
                    "storage_root": str(self.store),
                    "topics": topics,
                    "streams": {"internal_partitions": 3},
                    "kafka": {"session_timeout_s": 8},  # a killed trainer's partitions move in seconds
                    "model": {"base_model": str(tiny), "dtype": "float32"},
                    "lora": {"r": 4, "alpha": 8},
                    "training": {
                        "group_id": self.group_id,
                        "batch_size": 2,
                        "learning_rate": 0.005,
                        "metrics_port": 0,
                        **training,
                    },
                    **(settings or {}),
                }
            )
        )
        self.service = Service(self.config, ("trainer",), base / "trainer.log", log_says("trainer ready"), bootstrap)

    @property
    def procs(self):
        return self.service.procs

    @property
    def log_path(self) -> Path:
        return self.service.log_path

    def another(self, log_path: Path) -> TrainerHandle:
        """A second trainer of the same group, on the same topics and store, logging to `log_path`."""
        twin = object.__new__(TrainerHandle)
        twin.__dict__.update(self.__dict__)
        twin.service = Service(self.config, ("trainer",), log_path, log_says("trainer ready"), self.client.bootstrap_servers)
        return twin

    def start(self) -> TrainerHandle:
        self.service.start(timeout=180)
        return self

    def stop(self) -> None:
        self.service.stop()

    def request(self, user: str, examples: list[TrainingExample], test: list[TrainingExample] | None = None) -> TrainingRequest:
        ref = write_dataset(ArtifactStore(str(self.store)), user, examples, test or [], trigger="threshold", lineage_ranges=[])
        return TrainingRequest(
            request_id=request_id_for(user, ref.sha256, "threshold"), user_id=user, trigger="threshold", dataset=ref
        )

    def publish(self, request: TrainingRequest | bytes, key: str = "x") -> None:
        value = request if isinstance(request, bytes) else request.to_bytes()
        produce(self.client, self.topics["training_requests"], [(key if isinstance(request, bytes) else request.user_id, value)])

    def lifecycle(self) -> list[dict]:
        return [json.loads(r.value) for r in read_topic(self.client, self.topics["lifecycle"])]

    def wait_for(self, predicate, timeout: float = 180, what: str = "condition", interval: float = 0.5):
        return wait_until(
            predicate,
            timeout,
            what,
            interval=interval,
            check=self.service.check_alive,
            context=lambda: self.service.log()[-3000:],
        )


# ---- the API ------------------------------------------------------------------------- #


def health_says(url: str, field: str) -> Callable[[str], bool]:
    """Ready when `url`/healthz answers with `field` true (the API: `lifecycle_caught_up`; serve: `following_lifecycle`)."""

    def check(_log: str) -> bool:
        try:
            return bool(httpx.get(f"{url}/healthz", timeout=2).json().get(field))
        except httpx.HTTPError:
            return False

    return check


def api_ready(url: str) -> Callable[[str], bool]:
    """Ready when /healthz answers and the job tracker has read the lifecycle topic to its end."""
    return health_says(url, "lifecycle_caught_up")


def start_api(config: Path, bootstrap: str, log_path: Path) -> tuple[Service, str]:
    """An `adaptloop api` process on a free port, ready: (its service, its URL)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service = Service(config, ("api", "--port", str(port)), log_path, api_ready(url), bootstrap)
    service.start(timeout=60)
    return service, url


@dataclass
class ApiHandle:
    url: str
    client: ClientConfig
    topics: dict[str, str]
    store: Path
    config: Path
    tokens: dict[str, str] = field(default_factory=dict)
    service: Service | None = None

    def headers(self, who: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def commands(self) -> list[dict]:
        return [json.loads(r.value) for r in read_topic(self.client, self.topics["commands"])]

    def lifecycle(self, **event) -> None:
        """Publish a lifecycle event as a trainer would."""
        message = LifecycleEvent(event_id=f"ev-{uuid.uuid4().hex[:8]}", **event)
        produce(self.client, self.topics["lifecycle"], [(message.user_id, message.to_bytes())])

    def wait_for(self, predicate, timeout: float = 60, what: str = "condition"):
        return wait_until(predicate, timeout, what, interval=0.3)


def write_api_config(base: Path, topics: dict[str, str], **extra) -> Path:
    config = base / "adapter_retrain.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage_root": str(base / "store"),
                "topics": topic_config(topics),
                "streams": {"internal_partitions": 3, "app_id": f"app-{uuid.uuid4().hex[:6]}"},
                **extra,
            }
        )
    )
    return config


# ---- the whole loop ---------------------------------------------------------------------- #


class LoopHandle:
    """A worker, a trainer on the tiny model and an API on one config: the whole loop, for end-to-end tests."""

    def __init__(self, bootstrap: str, base: Path, tiny: Path, training: dict | None = None, **top) -> None:
        from api.auth import TokenStore

        suffix = uuid.uuid4().hex[:8]
        self.client = ClientConfig(bootstrap_servers=bootstrap)
        self.topics = unique_topics("loop")
        self.app_id = f"loop-{suffix}"
        self.store = base / "store"
        self.config = base / "adapter_retrain.yaml"
        settings = {
            "storage_root": str(self.store),
            "topics": topic_config(self.topics),
            "streams": {"app_id": self.app_id, "internal_partitions": 3, "batch_within_s": 0.2, "triggers": {"cooldown_s": 0}},
            "kafka": {"session_timeout_s": 8},
            "model": {"base_model": str(tiny), "dtype": "float32"},
            "lora": {"r": 4, "alpha": 8},
            "training": {
                "group_id": f"loop-{suffix}-trainer",  # not the worker's group (its app_id)
                "batch_size": 2,
                "learning_rate": 0.005,
                "metrics_port": 0,
                **(training or {}),
            },
            **top,
        }
        self.config.write_text(yaml.safe_dump(settings))
        self.token = TokenStore(self.store / "api" / "tokens.json").create(["admin"])[1]
        self.worker = Service(
            self.config, ("worker", "--web-port", "0"), base / "worker.log", log_says("Worker ready"), bootstrap
        )
        self.trainer = Service(self.config, ("trainer",), base / "trainer.log", log_says("trainer ready"), bootstrap)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = Service(self.config, ("api", "--port", str(self.port)), base / "api.log", api_ready(self.url), bootstrap)

    def start(self) -> LoopHandle:
        self.worker.start(timeout=90)
        self.trainer.start(timeout=180)
        self.api.start(timeout=60)
        return self

    def stop(self) -> None:
        for service in (self.api, self.trainer, self.worker):
            service.stop()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def publish(self, events: list[tuple[str, dict]]) -> None:
        for kind, event in events:
            produce(self.client, self.topics[kind], [(event["user_id"], json.dumps(event).encode())])

    def lifecycle(self) -> list[dict]:
        return [json.loads(r.value) for r in read_topic(self.client, self.topics["lifecycle"])]

    def cli(self, *args: str):
        """`adaptloop --config <this loop's config> ARGS` against this loop's broker."""
        import os
        import subprocess
        import sys

        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": self.client.bootstrap_servers}
        return subprocess.run(
            [sys.executable, "-m", "adaptloop.cli", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    def wait_for(self, predicate, timeout: float = 180, what: str = "condition", interval: float = 0.5):
        def alive() -> None:
            for service in (self.worker, self.trainer, self.api):
                service.check_alive()

        return wait_until(
            predicate,
            timeout,
            what,
            interval=interval,
            check=alive,
            context=lambda: "\n".join(s.log_tail(15) for s in (self.worker, self.trainer, self.api)),
        )


# ---- adaptloop serve --------------------------------------------------------------------- #


def serve_ready(url: str) -> Callable[[str], bool]:
    """Ready when /healthz answers and the server follows the lifecycle topic from its end."""
    return health_says(url, "following_lifecycle")


class ServeHandle:
    """A live `adaptloop serve` (tiny model) with admin and `user:alice` tokens; `start_worker()` adds a worker on its topics."""

    def __init__(
        self,
        bootstrap: str,
        base: Path,
        tiny: Path,
        serving: dict | None = None,
        topics: dict[str, str] | None = None,
        store: Path | None = None,
    ) -> None:
        from api.auth import TokenStore

        self.client = ClientConfig(bootstrap_servers=bootstrap)
        self.base_name = str(tiny)  # the base model's name (its id in the settings), first in /v1/models
        self.topics = topics or unique_topics("serve")
        self.store = store or base / "store"
        self.app_id = f"serve-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = base / "adapter_retrain.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "storage_root": str(self.store),
                    "topics": topic_config(self.topics),
                    "streams": {
                        "app_id": self.app_id,
                        "internal_partitions": 3,
                        "batch_within_s": 0.2,
                        "triggers": {"cooldown_s": 0},
                    },
                    "min_gap_events": 1000,
                    "model": {"base_model": str(tiny), "dtype": "float32"},
                    "serving": {"port": self.port, "sync_grace_s": 0.5, "sync_retry_max_s": 2, **(serving or {})},
                }
            )
        )
        tokens = TokenStore(self.store / "api" / "tokens.json")
        self.tokens = {"admin": tokens.create(["admin"])[1], "alice": tokens.create(["user:alice"])[1]}
        self.service = Service(
            self.config, ("serve", "--port", str(self.port)), base / "serve.log", serve_ready(self.url), bootstrap
        )
        self.worker = Service(
            self.config, ("worker", "--web-port", "0"), base / "worker.log", log_says("Worker ready"), bootstrap
        )

    def start(self) -> ServeHandle:
        self.service.start(timeout=120)
        return self

    def stop(self) -> None:
        self.service.stop()
        self.worker.stop()

    def headers(self, who: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def openai(self, who: str = "admin"):
        """The standard OpenAI client, pointed at this server as a chat app would point it."""
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=self.tokens[who], max_retries=0, timeout=120)

    def chat(self, question: str, who: str = "admin", **fields) -> httpx.Response:
        body = {
            "model": self.base_name,
            "messages": [{"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": 24,
            **fields,
        }
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=self.headers(who), timeout=120)

    def metric(self, name: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", headers=self.headers()).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)

    def lifecycle(self, **event) -> None:
        """Publish a lifecycle event as a trainer would."""
        message = LifecycleEvent(event_id=f"ev-{uuid.uuid4().hex[:8]}", **event)
        produce(self.client, self.topics["lifecycle"], [(message.user_id, message.to_bytes())])

    def wait_for(self, predicate, timeout: float = 60, what: str = "condition", interval: float = 0.1):
        return wait_until(
            predicate, timeout, what, interval=interval, check=self.service.check_alive, context=self.service.log_tail
        )
