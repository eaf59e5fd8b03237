"""Fixtures every tier shares: a real Kafka broker for the session, name factories, live services.

The broker comes from, in order: KAFKA_BOOTSTRAP_SERVERS; a testcontainers
Kafka container when a Docker engine answers; otherwise adaptloop's own jar
broker on a free port in a temporary directory (what runs on the dev machines
and in CI). Factories hand out uuid-named topics, groups and services, so
tests never interfere and need no teardown. Helpers are in tests/support/.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core.kafka.client import ClientConfig
from core.kafka.topics import TopicPlan, ensure_topics
from core.settings import Settings
from tests.support.adapters import write_facts
from tests.support.handles import (
    ApiHandle,
    LoopHandle,
    ServeHandle,
    TrainerHandle,
    WorkerHandle,
    handle_factory,
    make_worker,
    start_api,
    unique_topics,
    write_api_config,
)
from tests.support.processes import JAR_CACHE


def pytest_configure(config: pytest.Config) -> None:
    """Under `pytest -n N`, each worker (and every process it starts: brokers aside, trainers, workers, the demo) gets
    its share of the cores for torch's and BLAS's thread pools, not all of them.

    With two workers on two cores, each process sizing its OpenMP pool to the
    whole machine oversubscribes it: threads spin at every barrier waiting for
    a thread the other process holds, and on the tiny test models (thousands
    of small ops per second) that wait is most of the work. Set before torch
    is first imported; an explicit OMP_NUM_THREADS is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = str(max(1, (os.cpu_count() or 1) // workers))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(name, share)


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if external:
        yield external
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    from core.kafka.broker import LocalBroker, free_port

    broker = LocalBroker(port=free_port(), cache_dir=JAR_CACHE, data_dir=tmp_path_factory.mktemp("kafka"))
    bootstrap = broker.up()
    try:
        yield bootstrap
    finally:
        broker.down()


@pytest.fixture(scope="session")
def kafka_client(kafka_bootstrap: str) -> ClientConfig:
    return ClientConfig(bootstrap_servers=kafka_bootstrap, client_id="adaptloop-tests")


@pytest.fixture
def topic_factory(kafka_client: ClientConfig) -> Callable[..., str]:
    """Create a uniquely named topic: `topic_factory("events", partitions=3)`."""

    def make(prefix: str = "t", partitions: int = 1, config: dict[str, str] | None = None) -> str:
        name = f"test.{prefix}.{uuid.uuid4().hex[:10]}"
        ensure_topics(kafka_client, [TopicPlan(name, partitions, 1, tuple((config or {}).items()))])
        return name

    return make


@pytest.fixture
def group_factory() -> Callable[[str], str]:
    """A unique consumer-group id per call."""
    return lambda prefix="g": f"test-{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def isolated_settings(tmp_path: Path, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Settings]:
    """Settings whose topics are unique to the test and whose storage is a temp dir.

    `isolated_settings(min_gap_events=3)` overrides top-level keys.
    """
    from core.settings import TopicsSettings, load_settings

    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)

    def make(**overrides) -> Settings:
        base = load_settings()
        suffix = uuid.uuid4().hex[:8]
        topics = TopicsSettings(
            **{
                field: getattr(base.topics, field).model_copy(update={"name": f"{getattr(base.topics, field).name}.{suffix}"})
                for field in type(base.topics).model_fields
            }
        )
        return base.model_copy(update={"topics": topics, "storage_root": str(tmp_path / "store"), **overrides})

    return make


# ---- models and datasets ------------------------------------------------------------ #


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama built from a config (seconds to train), with the default model's tokenizer."""
    from trainer.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def facts_file(tmp_path) -> Path:
    return write_facts(tmp_path / "facts.jsonl")


# ---- live services -------------------------------------------------------------------- #


@pytest.fixture
def worker_factory(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., WorkerHandle]]:
    """`worker_factory(schedule="nightly", min_gap_events=3, streams={...})` -> a started worker."""

    def build(bootstrap: str | None = None, **settings) -> WorkerHandle:
        return make_worker(bootstrap or kafka_bootstrap, tmp_path_factory.mktemp("worker"), **settings)

    with handle_factory(build) as make:
        yield make


@pytest.fixture
def trainer_factory(kafka_bootstrap, tiny_model_dir, tmp_path_factory) -> Iterator[Callable[..., TrainerHandle]]:
    """`trainer_factory(epochs=2, checkpoint_every=5)` -> a started trainer on the tiny model (training.* overrides;
    `request_partitions=N`: the requests topic's partitions, 3 by default; `settings={...}`: other top-level keys)."""

    def build(
        bootstrap: str | None = None, request_partitions: int = 3, settings: dict | None = None, **training
    ) -> TrainerHandle:
        base = tmp_path_factory.mktemp("trainer")
        return TrainerHandle(bootstrap or kafka_bootstrap, base, tiny_model_dir, training, request_partitions, settings)

    with handle_factory(build) as make:
        yield make


@pytest.fixture
def api_server(kafka_bootstrap, tmp_path) -> Iterator[ApiHandle]:
    """A live `adaptloop api` with an admin token, a `user:alice` token and a `reviewer` token."""
    from api.auth import TokenStore

    topics = unique_topics("api")
    config = write_api_config(tmp_path, topics)
    store = tmp_path / "store"
    tokens = TokenStore(store / "api" / "tokens.json")
    handle = ApiHandle("", ClientConfig(bootstrap_servers=kafka_bootstrap), topics, store, config)
    handle.tokens = {
        "admin": tokens.create(["admin"])[1],
        "alice": tokens.create(["user:alice"])[1],
        "reviewer": tokens.create(["reviewer"])[1],
    }
    handle.service, handle.url = start_api(config, kafka_bootstrap, tmp_path / "api.log")
    yield handle
    handle.service.stop()


@pytest.fixture
def loop_factory(kafka_bootstrap, tiny_model_dir, tmp_path_factory) -> Iterator[Callable[..., LoopHandle]]:
    """`loop_factory(training={...}, min_gap_events=3)` -> a worker, a trainer (tiny model) and an API on one config."""

    def build(training: dict | None = None, **top) -> LoopHandle:
        return LoopHandle(kafka_bootstrap, tmp_path_factory.mktemp("loop"), tiny_model_dir, training, **top)

    with handle_factory(build) as make:
        yield make


@pytest.fixture
def serve_factory(kafka_bootstrap, tiny_model_dir, tmp_path_factory) -> Iterator[Callable[..., ServeHandle]]:
    """`serve_factory(serving={...}, topics=..., store=...)` -> a started `adaptloop serve` on the tiny model."""

    def build(**kwargs) -> ServeHandle:
        return ServeHandle(kafka_bootstrap, tmp_path_factory.mktemp("serve"), tiny_model_dir, **kwargs)

    with handle_factory(build) as make:
        yield make
