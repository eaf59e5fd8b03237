"""`adaptloop generate-data` against the real broker: same curation as the worker, --since works."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest
import yaml
from click.testing import CliRunner

from adaptloop.cli import cli
from core.kafka.client import ClientConfig
from core.kafka.io import produce
from core.kafka.topics import TopicPlan, ensure_topics
from schemas.dataset import from_jsonl
from tests.support.events import INPUT_KINDS, event
from tests.support.kafka import read_topic
from tests.support.processes import wait_until

pytestmark = pytest.mark.kafka


def test_generate_data_reads_topics_since_a_time(tmp_path, kafka_bootstrap, monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    client = ClientConfig(bootstrap_servers=kafka_bootstrap)
    suffix = str(int(time.time() * 1000))
    topics = {kind: f"gen.{kind}.{suffix}" for kind in INPUT_KINDS}
    ensure_topics(client, [TopicPlan(name, 2) for name in topics.values()])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"topics": {k: {"name": v} for k, v in topics.items()}, "storage_root": str(tmp_path / "s")}))

    def publish(events):
        for kind, data in events:
            produce(client, topics[kind], [(data["user_id"], json.dumps(data).encode())])

    publish([event("feedback", "liz", n) for n in range(3)] + [event("feedback", "other", 9)])
    produce(client, topics["feedback"], [(b"liz", b"{broken")])
    # --since falls just after the first batch's last broker timestamp; the second batch is sent once
    # the clock is past it, so the two batches are apart however fast this machine is.
    since_ms = max(r.timestamp_ms for r in read_topic(client, list(topics.values()))) + 1
    wait_until(lambda: time.time() * 1000 > since_ms + 1, 10, "the clock past the first batch", interval=0.001)
    since = datetime.fromtimestamp(since_ms / 1000, UTC).isoformat()
    publish([event("conversations", "liz", 5, rating=1), event("concept_gaps", "global", 6)])

    out = tmp_path / "liz.jsonl"
    result = CliRunner().invoke(cli, ["--config", str(cfg), "generate-data", "--user-id", "liz", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 invalid skipped" in result.output
    train = from_jsonl(out.read_bytes())
    test = from_jsonl((tmp_path / "liz.test.jsonl").read_bytes())
    assert {e.source for e in train} == {"correction", "conversation"}
    assert len(test) == 4 and not {e.prompt for e in test} & {e.prompt for e in train}
    assert all(e.provenance and e.provenance.topic in topics.values() for e in train)

    result = CliRunner().invoke(
        cli,
        ["--config", str(cfg), "generate-data", "--user-id", "liz", "--output", str(out), "--since", since, "--include-global"],
    )
    assert result.exit_code == 0, result.output
    sources = sorted({e.source for e in from_jsonl(out.read_bytes())})
    assert sources == ["conversation", "global"]


def test_generate_data_rejects_a_hostile_user_id(tmp_path):
    result = CliRunner().invoke(cli, ["generate-data", "--user-id", "../../etc", "--output", str(tmp_path / "x.jsonl")])
    assert result.exit_code != 0 and "user_id" in result.output
