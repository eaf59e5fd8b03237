"""`adaptloop replay`: the worker's datasets and tables rebuilt from the topics, the live group untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition

from core.kafka.broker import free_port
from core.settings import changelog_topic
from schemas import LifecycleEvent
from tests.support.events import event
from tests.support.handles import WorkerHandle
from tests.support.kafka import read_topic
from tests.support.prometheus import check_metric_names

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _adaptloop(w, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=w.client.bootstrap_servers)
    done = subprocess.run(
        [sys.executable, "-m", "adaptloop.cli", "--config", str(w.config_path), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _committed(w, group: str) -> dict[tuple[str, int], int]:
    consumer = Consumer(w.client.librdkafka(**{"group.id": group}))
    try:
        wanted = [TopicPartition(w.topics[k], p) for k in ("feedback", "commands", "lifecycle") for p in range(3)]
        return {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(wanted, timeout=30)}
    finally:
        consumer.close()


def _file(uri: str) -> bytes:
    return Path(uri.removeprefix("file://")).read_bytes()


def test_replay_rebuilds_identical_datasets_and_tables_without_touching_the_live_group(worker_factory, tmp_path):
    w = worker_factory(min_gap_events=4, streams={"curation": {"paraphrases": 2}})
    # alice crosses the threshold, her request completes, four more gaps trigger
    # a second request that replays the first dataset; bob stays below it.
    w.publish([event("feedback", "alice", n) for n in range(4)] + [event("feedback", "bob", n) for n in range(3)])
    w.publish_raw("feedback", [("mallory", b"{not json")])
    first = w.wait_for(lambda: [r for r in w.requests() if r["user_id"] == "alice"], what="alice's first request")[0]
    w.send(
        "lifecycle",
        "alice",
        LifecycleEvent(event_id="lc1", type="training_completed", user_id="alice", request_id=first["request_id"], version=1),
    )
    w.wait_for(lambda: w.states().get("alice", {}).get("open_request") is None, what="the request closed")
    w.publish([event("feedback", "alice", n) for n in range(10, 14)])

    def alices() -> list[dict] | None:
        found = [r for r in w.requests() if r["user_id"] == "alice"]
        return found if len(found) == 2 else None

    def settled() -> dict | None:
        states = w.states()
        return states if states.get("bob", {}).get("events_total") == 3 and states["alice"]["events_total"] == 8 else None

    def all_committed() -> dict | None:
        """The live group's offsets once it has committed past every record (it commits every second)."""
        offsets = _committed(w, w.app_id)
        done = {k: sum(o for (t, _), o in offsets.items() if t == w.topics[k] and o >= 0) for k in ("feedback", "lifecycle")}
        return offsets if done == {"feedback": 12, "lifecycle": 1} else None

    live = w.wait_for(alices, what="alice's second request")
    live_states = w.wait_for(settled, what="the live states")
    live_offsets = w.wait_for(all_committed, what="the live group's commits past every record")

    dry = _adaptloop(w, "replay", "--from", "2020-01-01T00:00:00Z", "--dry-run").stdout
    assert "13 record(s) in all" in dry, dry  # 11 events + 1 malformed on feedback, 1 lifecycle event
    assert f"{w.topics['feedback']}[" in dry and "tables and offsets go to the new app version" in dry

    app = f"{w.app_id}-v2-{uuid.uuid4().hex[:4]}"
    out = _adaptloop(w, "replay", "--from", "2020-01-01T00:00:00Z", "--app-id", app, "--out", str(tmp_path / "r")).stdout
    assert "1 invalid" in out and "2 training request(s)" in out, out
    rebuilt = [json.loads(line) for line in (tmp_path / "r/requests.jsonl").read_text().splitlines()]
    assert [r["request_id"] for r in rebuilt] == [r["request_id"] for r in live]
    for old, new in zip(live, rebuilt):
        assert new["dataset"]["sha256"] == old["dataset"]["sha256"]
        assert _file(new["dataset"]["uri"]) == _file(old["dataset"]["uri"])
        assert _file(new["dataset"]["test_uri"]) == _file(old["dataset"]["test_uri"])
        assert new["dataset"]["uri"].startswith(f"file://{tmp_path / 'r'}"), "replays never write into the live store"

    # The new app version holds the rebuilt tables and its offsets; the live group is untouched.
    assert _committed(w, w.app_id) == live_offsets
    assert _committed(w, app)[(w.topics["feedback"], 0)] >= 0
    assert sum(o for (t, _), o in _committed(w, app).items() if t == w.topics["feedback"]) == 12
    states = {r.key.decode(): json.loads(r.value) for r in read_topic(w.client, changelog_topic(app, "users"))}
    for user in ("alice", "bob"):
        for key in ("events_total", "requests_total", "gap_totals", "pending_first", "pending_next", "last_dataset_uri"):
            if key == "last_dataset_uri":  # a path in the replay's own store
                assert (states[user].get(key) is None) == (live_states[user].get(key) is None)
            else:
                assert states[user].get(key) == live_states[user].get(key), (user, key)

    # A worker of the new app version takes over: tables recovered, offsets where the replay ended.
    w.stop()
    config = yaml.safe_load(w.config_path.read_text())
    config["streams"]["app_id"] = app
    (tmp_path / "v2.yaml").write_text(yaml.safe_dump(config))
    v2 = WorkerHandle(
        w.client,
        tmp_path / "v2.yaml",
        w.topics,
        app,
        w.storage_root,
        w.internal_partitions,
        tmp_path / "v2.log",
        web_port=free_port(),
    )
    try:
        v2.start()
        w.publish([event("feedback", "bob", 3)])  # bob's 4th gap: over the threshold with his 3 replayed ones
        bobs = v2.wait_for(lambda: [r for r in w.requests() if r["user_id"] == "bob"], what="bob's request from v2")
        assert bobs[0]["dataset"]["example_counts"] == {"correction": 12} and bobs[0]["dataset"]["test_count"] == 4  # 4 facts
        assert v2.wait_for(lambda: v2.states().get("bob", {}).get("events_total"), what="bob's state") == 4, "nothing re-read"
        # Its metrics: what it processed, and its group's lag (0 once the last event is committed).
        lag = f'adaptloop_consumer_lag_messages{{group="{app}",topic="{w.topics["feedback"]}"}} 0.0'

        def metrics_with_lag() -> str | None:
            text = httpx.get(f"http://127.0.0.1:{v2.web_port}/metrics").text
            return text if lag in text else None

        text = v2.wait_for(metrics_with_lag, what="the lag on /metrics")
        assert "adaptloop_worker_events_processed_total 1.0" in text and "bob" not in text
        check_metric_names(text)
    finally:
        v2.stop()

    # One user only: a partial replay writes datasets, never tables or offsets.
    only = _adaptloop(
        w, "replay", "--from", "2020-01-01T00:00:00Z", "--user-id", "bob", "--app-id", f"{app}-bob", "--out", str(tmp_path / "b")
    ).stdout
    assert "datasets only" in only and "1 training request(s)" in only and "tables rebuilt" not in only
    (bob,) = [json.loads(line) for line in (tmp_path / "b/requests.jsonl").read_text().splitlines()]
    assert bob["dataset"]["sha256"] == bobs[0]["dataset"]["sha256"], "the same dataset as v2 built live"
    assert all(o < 0 for o in _committed(w, f"{app}-bob").values())
