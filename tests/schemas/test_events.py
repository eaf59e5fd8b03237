"""Input event schemas: round trips, every constraint, hostile user_ids, decoding."""

from __future__ import annotations

import json
from datetime import UTC

import pytest
from pydantic import ValidationError

from adaptloop.samples import malformed_messages, sample_events
from core.errors import InvalidMessage
from schemas import ConceptGap, ConversationTurn, Feedback, IntentTrace, check_user_id, decode
from schemas.events import EVENT_TYPE_BY_INPUT_KIND

pytestmark = pytest.mark.unit

BASE = {"event_id": "e-1", "user_id": "alice", "timestamp": "2026-11-25T10:00:00Z"}
VALID = {
    IntentTrace: BASE | {"intent": "fact", "status": "missed", "query": "q?", "resolution": "a.", "confidence": 0.5},
    Feedback: BASE | {"kind": "correction", "query": "q?", "response": "wrong", "correction": "right"},
    ConversationTurn: BASE | {"session_id": "s1", "question": "q?", "answer": "a.", "rating": 4},
    ConceptGap: BASE | {"concept": "LoRA", "related": ["PEFT"], "description": "Low-rank adaptation."},
}


@pytest.mark.parametrize("model", list(VALID))
def test_round_trip_through_bytes(model):
    event = decode(model, json.dumps(VALID[model]).encode())
    again = decode(model, event.to_bytes())
    assert again == event
    assert event.timestamp.tzinfo is not None


def test_every_sample_event_validates():
    for kind, data in sample_events(["u1", "u2"], per_user=12):
        EVENT_TYPE_BY_INPUT_KIND[kind].model_validate(data)


def test_naive_timestamp_is_read_as_utc():
    event = IntentTrace.model_validate(VALID[IntentTrace] | {"timestamp": "2026-11-25T10:00:00"})
    assert event.timestamp.tzinfo == UTC and event.timestamp.hour == 10


def test_events_are_frozen():
    event = IntentTrace.model_validate(VALID[IntentTrace])
    with pytest.raises(ValidationError, match="frozen"):
        event.query = "changed"  # type: ignore[misc]


BAD_VALUES = [
    (IntentTrace, "status", "exploded"),
    (IntentTrace, "confidence", 1.5),
    (IntentTrace, "confidence", -0.1),
    (IntentTrace, "query", ""),
    (IntentTrace, "query", "x" * 4001),
    (IntentTrace, "intent", "y" * 201),
    (IntentTrace, "query", "null byte \x00 inside"),
    (IntentTrace, "event_id", "has space"),
    (IntentTrace, "event_id", ""),
    (IntentTrace, "timestamp", "yesterday"),
    (IntentTrace, "schema_version", 99),
    (IntentTrace, "schema_version", 0),
    (Feedback, "kind", "praise"),
    (Feedback, "rating", 7),
    (Feedback, "rating", -2),
    (ConversationTurn, "rating", float("nan")),
    (ConceptGap, "related", ["x"] * 21),
    (ConceptGap, "related", "not a list"),
]


@pytest.mark.parametrize(("model", "field", "value"), BAD_VALUES)
def test_each_constraint_rejects_bad_values(model, field, value):
    with pytest.raises(InvalidMessage) as info:
        decode(model, json.dumps(VALID[model] | {field: value}).encode())
    assert field in info.value.reason


@pytest.mark.parametrize("model", list(VALID))
@pytest.mark.parametrize("field", ["event_id", "user_id", "timestamp"])
def test_common_fields_are_required(model, field):
    data = {k: v for k, v in VALID[model].items() if k != field}
    with pytest.raises(InvalidMessage, match=field):
        decode(model, json.dumps(data).encode())


def test_unknown_fields_are_rejected_by_name():
    with pytest.raises(InvalidMessage, match="resolutoin"):
        decode(IntentTrace, json.dumps(VALID[IntentTrace] | {"resolutoin": "typo"}).encode())


def test_correction_needs_its_text_and_rating_needs_a_value():
    with pytest.raises(InvalidMessage, match="correction"):
        decode(Feedback, json.dumps(VALID[Feedback] | {"correction": None}).encode())
    with pytest.raises(InvalidMessage, match="rating"):
        decode(Feedback, json.dumps(BASE | {"kind": "rating", "query": "q", "response": "r"}).encode())


@pytest.mark.parametrize(
    ("rating", "scale", "normalised"),
    [(-1, None, -1.0), (0.5, None, 0.5), (1, None, 1.0), (5, None, 1.0), (3, None, 0.0), (1, "stars", -1.0), (2, "stars", -0.5)],
)
def test_ratings_normalise_to_unit_scale(rating, scale, normalised):
    extra = {"rating": rating} | ({"rating_scale": scale} if scale else {})
    turn = ConversationTurn.model_validate(VALID[ConversationTurn] | extra)
    assert turn.normalized_rating == pytest.approx(normalised)


def test_rating_outside_its_declared_scale_is_rejected():
    with pytest.raises(InvalidMessage, match="unit scale"):
        decode(ConversationTurn, json.dumps(VALID[ConversationTurn] | {"rating": 4, "rating_scale": "unit"}).encode())


HOSTILE_USER_IDS = [
    "",
    "../etc/passwd",
    "..",
    ".",
    "...",
    "a/b",
    "a\\b",
    "/abs",
    "x" * 129,
    "bad\x00id",
    "tab\tid",
    "new\nline",
    "spa ce",
    "аlice",  # Cyrillic 'а'
    "ali..ce",
    "%2e%2e",
    "~root",
]


@pytest.mark.parametrize("user_id", HOSTILE_USER_IDS)
def test_hostile_user_ids_are_rejected(user_id):
    with pytest.raises(ValueError):
        check_user_id(user_id)
    with pytest.raises(InvalidMessage, match="user_id"):
        decode(IntentTrace, json.dumps(VALID[IntentTrace] | {"user_id": user_id}).encode())


@pytest.mark.parametrize("user_id", ["alice", "user-42@example.com", "A.B_c-1", "global", "x" * 128])
def test_safe_user_ids_are_accepted(user_id):
    assert check_user_id(user_id) == user_id


@pytest.mark.parametrize(("raw", "what"), malformed_messages())
def test_malformed_messages_get_a_reason(raw, what):
    with pytest.raises(InvalidMessage) as info:
        decode(IntentTrace, raw)
    assert info.value.reason


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty"),
        (b"\xc3\x28", "not UTF-8"),
        (b"{", "not JSON"),
        (b'"a string"', "not a JSON object"),
        (b"[" * 50_000 + b"]" * 50_000, "too large"),
    ],
)
def test_decode_reasons(raw, reason):
    with pytest.raises(InvalidMessage, match=reason):
        decode(IntentTrace, raw, max_bytes=64 * 1024)


def test_deep_nesting_within_size_limit_is_a_clear_error():
    raw = b'{"event_id": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    with pytest.raises(InvalidMessage):
        decode(IntentTrace, raw, max_bytes=1_000_000)
