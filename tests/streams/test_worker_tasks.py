"""Labelling tasks through Kafka: emitted within budget, never twice, answered by a correction that leads to training, expired."""

from __future__ import annotations

import json

import pytest

from api.jobs import JobTracker
from core.kafka.client import ClientConfig
from schemas import ReviewRequest
from schemas.decode import decode
from tests.support.events import event

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

T0 = 1_780_000_000.0


def _asked(user: str, n: int, question: str, t: float) -> tuple[str, dict]:
    """A missed intent without a resolution: a question still waiting for its answer."""
    return event("intent_traces", user, n, t0=t - n, query=question, resolution=None)


def test_tasks_are_emitted_within_budget_answered_by_a_correction_that_trains_and_expired(worker_factory):
    w = worker_factory(
        min_gap_events=8,
        active_learning={"daily_budget": 2, "min_asks": 2, "task_ttl_h": 1},
    )
    frequent = ["What is my locker code?"] * 4 + ["Which gate is my flight?"] * 3 + ["What is my desk number?"] * 2
    w.publish([_asked("ivy", n, q, T0 + n) for n, q in enumerate(frequent)] + [_asked("ivy", 20, "Who is Zed?", T0 + 20)])

    def tasks() -> list[ReviewRequest]:
        return [decode(ReviewRequest, r.value) for r in w.read("review_requests")]

    opened = w.wait_for(lambda: [t for t in tasks() if t.status == "open"], what="labelling tasks")
    w.publish([_asked("ivy", 21, "What is my locker code?", T0 + 21)])  # asked again while its task is open
    w.wait_for(lambda: w.states().get("ivy", {}).get("events_total") == 11, what="the 11th event counted")
    opened = [t for t in tasks() if t.status == "open"]
    assert [(t.question, t.asked) for t in opened] == [("What is my locker code?", 4), ("Which gate is my flight?", 3)], (
        "the two asked most, once each: the day's budget is 2"
    )
    assert all(t.user_id == "ivy" and t.kind == "missed_intent" for t in opened)

    locker, gate = opened
    answer = event(
        "feedback",
        "ivy",
        30,
        t0=T0,
        query=locker.question,
        response="I don't know.",
        correction="Your locker code is 4417.",
        review_request_id=locker.review_request_id,
    )
    w.publish([answer])
    w.wait_for(lambda: any(t.status == "answered" for t in tasks()), what="the answered task")
    # An hour later (event time) the other task has expired: the next event of the user says so.
    w.publish([event("feedback", "ivy", 31, t0=T0 + 3 * 3600 - 31)])
    w.wait_for(lambda: any(t.status == "expired" for t in tasks()), what="the expired task")
    closed = {t.review_request_id: t.status for t in tasks() if t.status != "open"}
    assert closed == {locker.review_request_id: "answered", gate.review_request_id: "expired"}

    tracker = JobTracker(ClientConfig(bootstrap_servers="unused:9092"), "c", "l", None, review_requests_topic="rr")
    for record in w.read("review_requests"):
        tracker._apply("rr", record.key, record.value)
    reopened = [t["question"] for t in tracker.open_tasks("ivy")]
    assert locker.question not in reopened and gate.question not in reopened, "what the API lists: nothing answered or expired"

    # Enough gaps (the corrections, missed intents) cross min_gap_events: the answer is in the training data.
    (request,) = w.wait_for(lambda: [r for r in w.requests() if r["user_id"] == "ivy"], what="ivy's training request")
    store = w.storage_root
    data = (store / request["dataset"]["uri"].split(str(store) + "/", 1)[1]).read_text()
    assert "Your locker code is 4417." in {json.loads(line)["response"] for line in data.splitlines()}
