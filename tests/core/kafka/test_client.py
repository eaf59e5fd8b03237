"""Kafka client configuration: producers' batches fitted to the topics' limits."""

from __future__ import annotations

import pytest

from core.kafka.client import RECORD_BATCH_OVERHEAD, ClientConfig
from core.settings import load_settings

pytestmark = pytest.mark.unit


def test_producers_batch_under_the_smallest_topic_limit_and_consumers_are_untouched(tmp_path):
    cfg = tmp_path / "limits.yaml"
    cfg.write_text(
        "topics:\n"
        "  feedback: {name: f, config: {max.message.bytes: '65536'}}\n"
        "  lifecycle: {name: l, config: {max.message.bytes: '8192'}}\n"
    )
    client = ClientConfig.from_settings(load_settings(cfg))
    assert client.producer_batch_bytes == 8192 - RECORD_BATCH_OVERHEAD, "the smallest limit, less a batch's framing"
    assert client.librdkafka_producer(**{"linger.ms": 5})["batch.size"] == 8192 - RECORD_BATCH_OVERHEAD
    assert "batch.size" not in client.librdkafka(**{"group.id": "g"}), "a consumer warns about producer keys"


def test_without_topic_limits_producers_keep_librdkafkas_default(tmp_path):
    cfg = tmp_path / "plain.yaml"
    cfg.write_text("topics:\n  feedback: {name: f}\n")
    client = ClientConfig.from_settings(load_settings(cfg))
    assert client.producer_batch_bytes is None and "batch.size" not in client.librdkafka_producer()
