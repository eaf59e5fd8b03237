"""Feedback on served answers: the events the server publishes are ones the worker accepts, whatever the texts held."""

from __future__ import annotations

import time

import pytest

from core.settings import defaults
from serving.feedback import Completion, RecentCompletions, UnknownCompletion, conversation_event, feedback_event
from serving.protocol import FeedbackRequest
from streams.decoding import SourceDecoder

pytestmark = pytest.mark.unit

ANSWERS = ["Rex.", "", "   ", "bell\x07 and\x00 nul", "x" * 100_000, "Ünïcödé ✓ \n two lines"]


def _decoder() -> SourceDecoder:
    s = defaults()
    inputs = {name: getattr(s.topics, name).name for name in ("intent_traces", "feedback", "conversations", "concept_gaps")}
    return SourceDecoder(inputs, s.topics.commands.name, s.kafka.max_event_bytes)


@pytest.mark.parametrize("answer", ANSWERS)
def test_every_event_the_server_publishes_passes_the_workers_decoding(answer):
    s, decode = defaults(), _decoder()
    completion = Completion("chatcmpl-1", "ana", answer or "What?", answer, "ana@v2", time.time())
    for request in (
        FeedbackRequest(completion_id="chatcmpl-1", rating=-1),
        FeedbackRequest(completion_id="chatcmpl-1", correction="Your dog is Rex.", comment="wrong name"),
    ):
        event = feedback_event(completion, request)
        key, envelope = decode(s.topics.feedback.name, 0, 0, event.to_bytes())
        assert key == b"ana" and envelope.parsed.kind == ("correction" if request.correction else "rating")
    turn = conversation_event(completion)
    key, envelope = decode(s.topics.conversations.name, 0, 0, turn.to_bytes())
    assert key == b"ana" and envelope.parsed.event_id == conversation_event(completion).event_id, "one event id per completion"


def test_recent_completions_tell_unknown_from_expired():
    kept = RecentCompletions(window=2)
    for n in range(3):
        kept.add(Completion(f"c{n}", "ana", "q", "a", "base", time.time()))
    assert kept.get("c2").id == "c2"
    with pytest.raises(UnknownCompletion, match="no longer kept") as expired:
        kept.get("c0")
    assert expired.value.expired
    with pytest.raises(UnknownCompletion, match="no completion nope") as unknown:
        kept.get("nope")
    assert not unknown.value.expired
