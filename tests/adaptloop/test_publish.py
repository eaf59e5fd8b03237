"""`adaptloop publish`: a recorded file back onto its topics, exactly; bad files name the bad line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import yaml

from adaptloop.publish import OutgoingRecord, PublishFileError, parse_line, read_publish_file, retention_warnings
from tests.support.kafka import read_topic

TOPICS = {"feedback": "interactions.feedback", "commands": "adapter.commands", "intent_traces": "interactions.intent-traces"}


@pytest.mark.unit
def test_lines_name_their_topic_or_their_event_type():
    record = parse_line('{"topic": "feedback", "value": {"user_id": "ana", "x": 1}, "timestamp_ms": 5}', TOPICS, "f:1")
    assert (record.topic, record.key, json.loads(record.value), record.timestamp_ms) == (
        "interactions.feedback",
        b"ana",
        {"user_id": "ana", "x": 1},
        5,
    )
    raw = parse_line('{"topic": "adapter.commands", "key": "k", "value": "not json at all"}', TOPICS, "f:2")
    assert (raw.topic, raw.key, raw.value) == ("adapter.commands", b"k", b"not json at all")
    bare = parse_line('{"event_type": "intent-traces", "user_id": "bo", "event_id": "e1"}', TOPICS, "f:3")
    assert (bare.topic, bare.key, json.loads(bare.value)) == (
        "interactions.intent-traces",
        b"bo",
        {"user_id": "bo", "event_id": "e1"},
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    "line, words",
    [
        ("{oops", "not JSON"),
        ("[1]", "expected a JSON object"),
        ('{"user_id": "ana"}', "needs a 'topic'"),
        ('{"topic": "nope", "value": {}}', "unknown topic or event type 'nope'"),
        ('{"topic": "feedback"}', "needs a value"),
        ('{"topic": "feedback", "value": {}, "timestamp_ms": "yesterday"}', "timestamp_ms"),
    ],
)
def test_a_bad_line_is_named_by_its_number(tmp_path, line, words):
    path = tmp_path / "events.jsonl"
    path.write_text('{"event_type": "feedback", "user_id": "ana"}\n\n' + line + "\n")
    with pytest.raises(PublishFileError, match=f"events.jsonl:3: .*{words}"):
        read_publish_file(path, TOPICS)


@pytest.mark.kafka
def test_publish_round_trip_keeps_keys_values_order_and_timestamps(kafka_client, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    names = {"feedback": f"pub.feedback.{suffix}", "commands": f"pub.commands.{suffix}"}
    config = tmp_path / "settings.yaml"
    # A backfill keeps records' original times; one from 2023 outlives the default retention (7 days) only on a
    # topic that keeps records forever: the broker would delete it at its next retention check, minutes later.
    forever = {"retention.ms": "-1"}
    topics = {k: {"name": v, "config": forever} for k, v in names.items()}
    config.write_text(yaml.safe_dump({"storage_root": str(tmp_path / "store"), "topics": topics}))
    lines = [{"event_type": "feedback", "event_id": f"e{n}", "user_id": f"u{n % 3}", "note": "ünï"} for n in range(20)]
    lines += [
        {"topic": "commands", "key": "u1", "value": {"type": "retrain", "user_id": "u1"}, "timestamp_ms": 1_700_000_000_000}
    ]
    lines += [{"topic": names["feedback"], "key": "u2", "value": "\u0000raw bytes stay raw"}]
    path = tmp_path / "archive.jsonl"
    path.write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n")
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=kafka_client.bootstrap_servers)
    run = [sys.executable, "-m", "adaptloop.cli", "--config", str(config)]
    subprocess.run([*run, "topics", "ensure"], check=True, env=env, capture_output=True, timeout=120)

    dry = subprocess.run([*run, "publish", str(path), "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0 and "22 record(s) checked" in dry.stdout, dry.stderr
    assert "retention" not in dry.stderr, "the topics keep records forever: no warning"
    assert read_topic(kafka_client, list(names.values())) == [], "a dry run sends nothing"
    done = subprocess.run([*run, "publish", str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"21 -> {names['feedback']}" in done.stdout, done.stdout + done.stderr

    got = read_topic(kafka_client, list(names.values()))  # publish returned: every record is acknowledged
    feedback = [r for r in got if r.topic == names["feedback"]]
    assert len(got) == 22
    for user in ("u0", "u1", "u2"):  # order is kept per key (one key, one partition)
        sent = [
            json.dumps({k: v for k, v in line.items() if k != "event_type"}, ensure_ascii=False).encode()
            for line in lines[:20]
            if line["user_id"] == user
        ]
        assert [r.value for r in feedback if r.key == user.encode() and r.value.startswith(b"{")] == sent
    assert [r.value for r in feedback if not r.value.startswith(b"{")] == ["\u0000raw bytes stay raw".encode()]
    (command,) = [r for r in got if r.topic == names["commands"]]
    assert command.timestamp_ms == 1_700_000_000_000 and command.key == b"u1"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"event_type": "feedback", "user_id": "a"}\n{"topic": "elsewhere", "value": {}}\n')
    refused = subprocess.run([*run, "publish", str(bad)], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "bad.jsonl:2" in refused.stderr and "elsewhere" in refused.stderr
    assert len(read_topic(kafka_client, list(names.values()))) == 22, "nothing of a bad file is sent"


@pytest.mark.kafka
def test_records_older_than_their_topics_retention_are_named_before_anything_is_sent(kafka_client, topic_factory):
    week, forever = (
        topic_factory("pub-week", config={"retention.ms": str(7 * 86_400_000)}),
        topic_factory("pub-forever", config={"retention.ms": "-1"}),
    )
    now = 1_800_000_000_000
    records = [
        OutgoingRecord(week, b"k", b"{}", now - 8 * 86_400_000),
        OutgoingRecord(week, b"k", b"{}", now - 86_400_000),
        OutgoingRecord(week, b"k", b"{}"),
        OutgoingRecord(forever, b"k", b"{}", 0),
    ]
    (warning,) = retention_warnings(kafka_client, records, now_ms=now)
    assert warning.startswith(f"1 record(s) for {week} have timestamps older than its retention.ms (7.0 days)")
    assert retention_warnings(kafka_client, records[1:], now_ms=now) == [], "within the retention, or a topic that keeps all"
    assert retention_warnings(kafka_client, [OutgoingRecord("pub.missing.topic", None, b"{}", 0)]) == [], (
        "publishing names a missing topic itself"
    )
