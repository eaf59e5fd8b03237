"""Active learning in the worker's processor: which questions become labelling tasks, how often, and how they end."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core.settings import ActiveLearningSettings
from core.storage import ArtifactStore
from schemas.review_requests import ReviewRequest
from streams.active import question_key
from streams.envelope import Envelope
from streams.processor import BatchStats, ProcessorConfig, UserProcessor
from streams.state import MemoryUserLog, UserState
from streams.triggers import TriggerConfig

pytestmark = pytest.mark.unit

T0 = 1_780_000_000.0  # 2026-05-28, a UTC day well inside


def _event(n: int, t: float, topic_kind: str, **body) -> Envelope:
    body = {"event_id": f"ann-{n}", "user_id": "ann", "timestamp": datetime.fromtimestamp(t, UTC).isoformat(), **body}
    return Envelope(k="event", kind=topic_kind, body=body)


def missed(n: int, question: str, t: float, confidence: float | None = None) -> Envelope:
    extra = {} if confidence is None else {"confidence": confidence}
    return _event(n, t, "intent_traces", intent="fact", status="missed", query=question, **extra)


def correction(n: int, question: str, t: float, task: str | None = None) -> Envelope:
    extra = {} if task is None else {"review_request_id": task}
    return _event(n, t, "feedback", kind="correction", query=question, response="I don't know.", correction="It is 42.", **extra)


class User:
    """One user's state and log, fed through the worker's processor batch by batch."""

    def __init__(self, tmp_path, **active) -> None:
        cfg = ProcessorConfig.from_settings(
            triggers=TriggerConfig.from_settings(schedule="on-demand"),
            active=ActiveLearningSettings(**{"daily_budget": 2, "min_asks": 2, **active}),
        )
        self.processor = UserProcessor(cfg, ArtifactStore(str(tmp_path)))
        self.state, self.log = UserState(), MemoryUserLog()
        self.stats = BatchStats()

    def batch(self, *envelopes: Envelope) -> list[ReviewRequest]:
        out = self.processor.handle("ann", self.state, self.log, list(envelopes), self.stats)
        return [m for m in out if isinstance(m, ReviewRequest)]


def test_the_questions_asked_most_become_tasks_within_the_daily_budget(tmp_path):
    user = User(tmp_path)
    questions = {"What is my locker code?": 5, "Which bus goes to my office?": 3, "What is my PIN hint?": 2, "Who is Zed?": 1}
    envelopes, n = [], 0
    for question, times in questions.items():
        for _ in range(times):
            n += 1
            envelopes.append(missed(n, question, T0 + n))
    tasks = user.batch(*envelopes)
    assert [(t.question, t.asked, t.status) for t in tasks] == [
        ("What is my locker code?", 5, "open"),
        ("Which bus goes to my office?", 3, "open"),
    ], "best first, two a day"
    assert all(t.kind == "missed_intent" and t.uncertainty == 1.0 for t in tasks)
    assert tasks[0].value > tasks[1].value and tasks[0].expires_at > tasks[0].created_at
    assert user.batch(missed(100, "What is my locker code?", T0 + 100), missed(101, "What is my PIN hint?", T0 + 101)) == [], (
        "no task twice while one is open, and the day's budget is spent"
    )
    next_day = user.batch(missed(102, "Who is Zed?", T0 + 86_400))
    assert [t.question for t in next_day] == ["What is my PIN hint?", "Who is Zed?"], "a new day, a new budget"
    assert user.stats.tasks == {"open": 4}


def test_a_correction_answers_its_task_and_an_unanswered_one_expires(tmp_path):
    user = User(tmp_path, task_ttl_h=1)
    first, second = user.batch(*(missed(n, q, T0 + n) for n, q in enumerate(["Q one?", "Q one?", "Q two?", "q TWO"], 1)))
    answered = user.batch(correction(10, "What is it?", T0 + 60, task=first.review_request_id))
    assert [(t.review_request_id, t.status) for t in answered] == [(first.review_request_id, "answered")]
    expired = user.batch(correction(11, "Something else?", T0 + 4000))
    assert [(t.review_request_id, t.status) for t in expired] == [(second.review_request_id, "expired")]
    assert [e.question for e in user.state.unresolved] == [second.question], "an expired question may be asked again"
    assert first.question == "Q two?", "the same count: the more recent is worth more"
    assert user.state.pending_count >= 2, "the answer is curated like any correction"


def test_a_correction_of_the_question_itself_resolves_it_and_confident_answers_are_not_asked(tmp_path):
    user = User(tmp_path)
    user.batch(missed(1, "Where is my car parked?", T0), missed(2, "Where is my car parked?", T0 + 1, confidence=0.2))
    user.state.unresolved[0].task_id = None  # as if never asked
    user.batch(correction(3, "where is my car parked", T0 + 2))
    assert user.state.unresolved == [], "resolved by a correction in other words of case and punctuation"
    sure = _event(4, T0 + 3, "intent_traces", intent="fact", status="satisfied", query="Q?", response="A.", confidence=0.9)
    unsure = _event(5, T0 + 4, "intent_traces", intent="fact", status="satisfied", query="R?", response="B.", confidence=0.3)
    user.batch(sure, unsure)
    assert [(e.key, e.kind, e.uncertainty) for e in user.state.unresolved] == [("r", "low_confidence", 0.7)]


def test_a_batch_processed_again_opens_the_very_same_tasks_and_another_run_resends_them(tmp_path):
    envelopes = [missed(n, "What is my gate number?", T0 + n) for n in range(1, 4)]
    once, again = User(tmp_path), User(tmp_path)
    (task,) = once.batch(*envelopes)
    assert [t.review_request_id for t in again.batch(*envelopes)] == [task.review_request_id]
    restarted = UserProcessor(once.processor.cfg, once.processor.store)
    resent = restarted.handle("ann", once.state, once.log, [], BatchStats())
    assert [(m.review_request_id, m.status) for m in resent if isinstance(m, ReviewRequest)] == [(task.review_request_id, "open")]


def test_the_tracked_questions_are_bounded_and_an_opted_out_user_is_never_asked(tmp_path):
    user = User(tmp_path, max_tracked=3, min_asks=1, daily_budget=0)
    user.batch(*(missed(n, f"Question {n}?", T0 + n) for n in range(10)))
    assert len(user.state.unresolved) == 3
    quiet = User(tmp_path)
    quiet.state.training_consent = False
    assert quiet.batch(*(missed(n, "Q?", T0 + n) for n in range(5))) == [] and quiet.state.unresolved == []


def test_question_keys_ignore_case_and_punctuation():
    assert question_key("What's my PIN?") == question_key("what s my pin") == "what s my pin"


def test_user_suite_questions_a_promoted_version_fails_are_asked_about_at_once(tmp_path):
    user = User(tmp_path)
    at = datetime.fromtimestamp(T0, UTC).isoformat()
    details = {"missed_cases": ["What's the name of my dog?", "Tell me where I was born."]}
    promoted = Envelope(
        k="lifecycle", body={"type": "promoted", "user_id": "ann", "version": 2, "timestamp": at, "details": details}
    )
    tasks = user.batch(promoted)
    assert sorted((t.question, t.kind) for t in tasks) == [
        ("Tell me where I was born.", "failed_case"),
        ("What's the name of my dog?", "failed_case"),
    ], "a failed check is worth a task without waiting to be asked twice"
