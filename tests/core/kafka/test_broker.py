"""The project's own Kafka broker, for real: produce/consume, restart, CLI, errors."""

from __future__ import annotations

import json
import multiprocessing
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from confluent_kafka import Producer

from core.errors import BrokerError, KafkaOperationError
from core.kafka import io as kafka_io
from core.kafka.broker import LocalBroker, broker_answers, free_port
from core.kafka.client import ClientConfig
from core.kafka.io import produce
from core.kafka.topics import TopicPlan, ensure_topics
from tests.support.kafka import read_topic
from tests.support.processes import JAR_CACHE, run_cli

pytestmark = pytest.mark.kafka


def test_produce_and_read_back_through_the_broker(kafka_client, topic_factory):
    topic = topic_factory("roundtrip", partitions=3)
    sent = [(f"user-{i % 5}", json.dumps({"n": i}).encode()) for i in range(200)]
    assert produce(kafka_client, topic, sent) == 200
    got = read_topic(kafka_client, topic)  # produce() returned: all 200 are acknowledged
    assert sorted(json.loads(r.value)["n"] for r in got) == list(range(200))
    # Keyed by user: every user's messages land in one partition, in order.
    by_user: dict[bytes, set[int]] = {}
    for record in got:
        by_user.setdefault(record.key, set()).add(record.partition)
    assert all(len(parts) == 1 for parts in by_user.values())


def test_records_deleted_after_planning_end_the_read_instead_of_hanging_it(kafka_client, topic_factory):
    # A forget's delete-records (or retention) between planning a read and reading it: the range's start is gone
    # and so are its last offsets. Before, the reader's start reset to the partition's end and waited out its
    # timeout for offsets that no longer existed (seen in CI, tests/reliability/test_privacy.py).
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    topic = topic_factory("deleted", partitions=2)
    produce(kafka_client, topic, [(b"k", b"%d" % i, None, i % 2) for i in range(20)])
    ranges = kafka_io.offset_ranges(kafka_client, [topic])
    assert [(r.start, r.end) for r in ranges] == [(0, 10), (0, 10)]
    admin = AdminClient(kafka_client.librdkafka())
    gone = [TopicPartition(topic, 0, 10), TopicPartition(topic, 1, 4)]  # all of partition 0, the first 4 of 1
    for future in admin.delete_records(gone, request_timeout=30).values():
        future.result()
    got = list(kafka_io.read_ranges(kafka_client, ranges, timeout=20))
    assert [(r.partition, r.offset) for r in got] == [(1, offset) for offset in range(4, 10)]


def test_the_process_keeps_its_producer_until_a_send_fails(kafka_client, topic_factory, monkeypatch):
    topic = topic_factory("kept", partitions=2)
    made: list = []
    monkeypatch.setattr(kafka_io, "Producer", lambda conf, **kw: made.append(Producer(conf, **kw)) or made[-1])
    monkeypatch.setattr(kafka_io, "_kept", {})  # none kept from earlier tests

    def send(values: range) -> None:
        for n in values:
            produce(kafka_client, topic, [(f"user{n % 5}".encode(), b"%d" % n)])

    with ThreadPoolExecutor(4) as threads:  # callers in several threads share it, one send at a time
        list(threads.map(send, [range(i, 100, 4) for i in range(4)]))
    assert len(made) == 1, "every send after the first reuses its producer"
    with pytest.raises(KafkaOperationError, match="not acknowledged"):  # topic auto-creation is off: never delivered
        produce(kafka_client, f"test.missing.{uuid.uuid4().hex[:8]}", [(b"k", b"x")], timeout=2)
    send(range(100, 101))
    assert len(made) == 2, "after a failure the next send starts a new producer"
    assert sorted(int(r.value) for r in read_topic(kafka_client, topic)) == list(range(101))


def test_a_forked_child_sends_with_a_producer_of_its_own(kafka_client, topic_factory):
    topic = topic_factory("forked", partitions=1)
    produce(kafka_client, topic, [(b"k", b"parent")])  # the parent keeps a producer; the child inherits the object
    child = multiprocessing.get_context("fork").Process(target=produce, args=(kafka_client, topic, [(b"k", b"child")]))
    child.start()
    child.join(60)
    assert child.exitcode == 0, "librdkafka's threads do not survive a fork: the child needs a producer of its own"
    produce(kafka_client, topic, [(b"k", b"parent again")])
    assert sorted(r.value for r in read_topic(kafka_client, topic)) == [b"child", b"parent", b"parent again"]


def test_topics_ensure_is_idempotent_and_reports_mismatch(kafka_client):
    name = f"test.ensure.{uuid.uuid4().hex[:8]}"
    first = ensure_topics(kafka_client, [TopicPlan(name, 2, 1, (("retention.ms", "3600000"),))])
    assert first[0].created and first[0].partitions == 2
    again = ensure_topics(kafka_client, [TopicPlan(name, 4)])
    assert not again[0].created and again[0].partitions == 2 and "4" in again[0].note


_cli = run_cli


@pytest.mark.slow
def test_broker_restart_keeps_data_via_cli(tmp_path):
    """`kafka up` twice is harmless; `down`/`up` on the same data dir loses nothing."""
    port = free_port()
    data = tmp_path / "kafka-data"
    up = _cli("kafka", "up", "--port", str(port), "--data-dir", str(data))
    assert up.returncode == 0, up.stderr
    bootstrap = up.stdout.strip().splitlines()[-1]
    assert bootstrap == f"127.0.0.1:{port}"
    try:
        again = _cli("kafka", "up", "--port", str(port), "--data-dir", str(data))
        assert again.returncode == 0 and "already running" in again.stderr
        assert "up at" in _cli("kafka", "status", "--port", str(port)).stdout

        client = ClientConfig(bootstrap_servers=bootstrap)
        ensure_topics(client, [TopicPlan("durable", 2)])
        produce(client, "durable", [(f"k{i}", f"v{i}".encode()) for i in range(50)])

        down = _cli("kafka", "down", "--port", str(port))
        assert down.returncode == 0 and "stopped" in down.stdout
        assert not broker_answers(bootstrap, timeout=1)
        assert "no broker" in _cli("kafka", "status", "--port", str(port)).stdout

        assert _cli("kafka", "up", "--port", str(port), "--data-dir", str(data)).returncode == 0
        values = sorted(r.value.decode() for r in read_topic(client, "durable"))
        assert values == sorted(f"v{i}" for i in range(50))
    finally:
        _cli("kafka", "down", "--port", str(port))


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        broker = LocalBroker(port=port, cache_dir=JAR_CACHE, data_dir=tmp_path)
        with pytest.raises(BrokerError, match=f"port {port} is already in use"):
            broker.up()
        assert "not by a broker that adaptloop started" in broker.status()


def test_down_without_a_broker_says_so(tmp_path):
    broker = LocalBroker(port=free_port(), cache_dir=tmp_path)
    assert broker.down() is False


def test_external_cluster_means_no_local_broker(kafka_bootstrap):
    result = _cli("kafka", "up", env={"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap})
    assert result.returncode == 0 and "no local broker started" in result.stdout
    status = _cli("kafka", "status", env={"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap})
    assert "answering" in status.stdout and "NOT" not in status.stdout


def test_a_cluster_id_starting_with_a_dash_formats(tmp_path):
    """base64 cluster ids can start with '-', which argument parsers read as an option."""
    data = tmp_path / "d"
    data.mkdir()
    (data / "adaptloop-node.json").write_text(json.dumps({"cluster_id": "-" + "A" * 21}))
    broker = LocalBroker(port=free_port(), cache_dir=JAR_CACHE, data_dir=data)
    try:
        assert broker.up() == broker.bootstrap
    finally:
        broker.down()


def test_a_topic_with_a_small_message_limit_gets_every_message_in_batches_it_accepts(kafka_client, topic_factory):
    """The broker refuses a record batch above the topic's `max.message.bytes` whole (librdkafka batches up to
    1,000,000 bytes): a producer fitted to the limit sends many small messages in batches it accepts."""
    from dataclasses import replace

    from core.kafka.client import RECORD_BATCH_OVERHEAD

    limit = 4096
    topic, unfitted = (topic_factory(name, config={"max.message.bytes": str(limit)}) for name in ("small-limit", "unfitted"))
    sent = [(f"user-{i % 3}", json.dumps({"n": i, "pad": "x" * 500}).encode()) for i in range(200)]  # ~100 KB
    with pytest.raises(KafkaOperationError, match="(?i)too large"):
        produce(kafka_client, unfitted, sent)  # librdkafka's default batches: refused whole
    fitted = replace(kafka_client, client_id="adaptloop-tests-fitted", producer_batch_bytes=limit - RECORD_BATCH_OVERHEAD)
    assert produce(fitted, topic, sent) == 200
    got = read_topic(kafka_client, topic)
    assert sorted(json.loads(r.value)["n"] for r in got) == list(range(200)), "every message once"
