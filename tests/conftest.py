"""Shared fixtures: a real Kafka broker for the session, and factories for names.

The broker comes from, in order: KAFKA_BOOTSTRAP_SERVERS; a testcontainers
Kafka container when a Docker engine answers; otherwise adaptloop's own jar
broker on a free port in a temporary directory (what runs on the dev machines
and in CI). Factories hand out uuid-named topics and groups, so tests never
interfere and need no teardown.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adaptloop.kafka.client import ClientConfig
from adaptloop.kafka.topics import TopicPlan, ensure_topics
from adaptloop.settings import Settings

# The jars are fetched once per machine; tests share the user's cache for them.
JAR_CACHE = Path(os.environ.get("ADAPTLOOP_TEST_CACHE", Path.home() / ".cache" / "adaptloop"))


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`adaptloop ARGS` with the test jar cache and without the session broker's KAFKA_BOOTSTRAP_SERVERS."""
    full_env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    full_env["ADAPTLOOP_CACHE_DIR"] = str(JAR_CACHE)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "adaptloop.cli", *args], capture_output=True, text=True, env=full_env, timeout=240)


def stop_processes(procs, timeout: float = 30) -> None:
    """Terminate the service processes a test started (SIGTERM, then SIGKILL)."""
    import subprocess

    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_until(predicate: Callable[[], object], timeout: float, what: str, *, interval: float = 0.5,
               check: Callable[[], None] | None = None, context: Callable[[], str] = lambda: ""):  # fmt: skip
    """Poll `predicate` until it returns something truthy (returned); `check` may raise early (a process died)."""
    import time

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        if check is not None:
            check()
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last={last!r}\n{context()}")


def check_metric_names(text: str) -> None:
    """Prometheus conventions: the adaptloop_ prefix, counters end in _total, no per-user labels."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name.startswith(("python_", "process_")):
            continue  # the client library's own
        assert family.name.startswith("adaptloop_"), family.name
        for sample in family.samples:
            assert "user_id" not in sample.labels and "user" not in sample.labels, sample
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name


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
    from adaptloop.kafka.broker import LocalBroker, free_port

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
    from adaptloop.settings import TopicsSettings, load_settings

    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)

    def make(**overrides) -> Settings:
        base = load_settings()
        suffix = uuid.uuid4().hex[:8]
        topics = TopicsSettings(
            **{
                field: spec.model_copy(update={"name": f"{spec.name}.{suffix}"})
                for field, spec in base.topics.model_dump().items()
                for spec in [getattr(base.topics, field)]
            }
        )
        update = {"topics": topics, "storage_root": str(tmp_path / "store"), **overrides}
        return base.model_copy(update=update)

    return make
