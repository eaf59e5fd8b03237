"""Job state from commands and lifecycle events (no broker: the reader's apply step on its own)."""

from __future__ import annotations

import json

import pytest

from api.jobs import JobTracker
from core.kafka.client import ClientConfig

pytestmark = pytest.mark.unit


def _tracker() -> JobTracker:
    return JobTracker(ClientConfig(bootstrap_servers="unused:9092"), "cmd", "life", "app-users-changelog")


def _event(n: int, kind: str, **fields) -> bytes:
    return json.dumps(
        {"event_id": f"e{n}", "type": kind, "user_id": "ann", "job_id": "j1", "timestamp": "2026-11-26T00:00:00+00:00", **fields}
    ).encode()


def test_a_retrain_job_follows_its_events_once_each():
    t = _tracker()
    t._apply(
        "cmd",
        b"ann",
        json.dumps(
            {"command_id": "j1", "type": "retrain", "user_id": "ann", "requested_at": "2026-11-26T00:00:00+00:00"}
        ).encode(),
    )
    assert t.get("j1").status == "queued"
    events = [
        _event(1, "training_started"),
        _event(2, "training_completed", version=2, metrics={"final_loss": 0.1}),
        _event(3, "validated", version=2, details={"passed": False}),
        _event(4, "rejected", version=2, reason="core suite regressed", metrics={"core_score": 0.4, "user_score": 0.9}),
    ]
    for raw in events + events:  # a reconnect reads everything again
        t._apply("life", b"ann", raw)
    job = t.get("j1")
    assert job.status == "rejected" and job.version == 2 and job.passed is False and job.reason == "core suite regressed"
    assert [e["type"] for e in job.events] == ["training_started", "training_completed", "validated", "rejected"]
    assert len(t.activity.trainings) == 1 and t.counts() == {"rejected": 1}


def test_finished_jobs_do_not_move_back_and_bad_messages_are_skipped():
    t = _tracker()
    t.add("j1", "validate", "ann")
    t._apply("life", b"ann", _event(1, "validated", version=1, details={"passed": True}))
    t._apply("life", b"ann", _event(2, "training_started"))
    assert t.get("j1").status == "validated" and t.get("j1").passed is True
    t._apply("life", b"ann", b"{not json")
    t._apply("cmd", b"ann", b"[1, 2]")
    t._apply("app-users-changelog", b"ann", json.dumps({"gaps": [[1.0, "correction"], [2.0, "concept_gap"]]}).encode())
    assert t.activity.pending_gaps == {"ann": 2}
    t._apply("app-users-changelog", b"ann", None)  # a deleted key
    assert t.activity.pending_gaps == {"ann": 0}


def test_consent_commands_are_no_jobs_and_the_worker_state_says_who_opted_out():
    t = _tracker()
    t._apply("cmd", b"ann", json.dumps({"command_id": "c1", "type": "consent", "user_id": "ann", "train": False}).encode())
    assert t.get("c1") is None, "nothing ends a consent command: it would stay queued forever"
    t._apply("app-users-changelog", b"ann", json.dumps({"gaps": [], "training_consent": False}).encode())
    assert t.activity.opted_out == {"ann"}
    t._apply("app-users-changelog", b"ann", json.dumps({"gaps": [], "training_consent": True}).encode())
    assert t.activity.opted_out == set()


def test_in_review_mode_a_retrain_and_its_request_end_awaiting_review():
    t = _tracker()
    t._apply("cmd", b"ann", json.dumps({"command_id": "j1", "type": "retrain", "user_id": "ann"}).encode())
    t.requests.request({"request_id": "r1", "user_id": "ann", "trigger": "on-demand"})
    for n, kind in enumerate(["training_started", "training_completed", "validated", "awaiting_review"]):
        t._apply("life", b"ann", _event(n, kind, version=1, request_id="r1", details={"review_id": "r-0123456789ab"}))
    assert t.get("j1").status == "awaiting_review" and t.get("j1").ended
    view = t.requests.of("ann")
    assert view is not None and view.state == "awaiting_review" and not view.open
    assert view.describe().startswith("awaiting_review v1")
