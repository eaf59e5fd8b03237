"""Internal messages: commands, training requests, lifecycle events, dead letters, JSON Schema export."""

from __future__ import annotations

import hashlib
import json

import jsonschema
import pytest
from pydantic import ValidationError

from core.errors import InvalidMessage
from core.redaction import DISABLED, Redactor
from schemas import (
    COMMAND_ADAPTER,
    MESSAGE_TYPES,
    DeadLetter,
    LifecycleEvent,
    RollbackCommand,
    TrainingRequest,
    decode,
    export_json_schemas,
)
from schemas.training import DatasetRef, OffsetRange, TrainingExample, request_id_for

pytestmark = pytest.mark.unit


def _request(**overrides) -> TrainingRequest:
    sha = "a" * 64
    data = dict(
        request_id=request_id_for("alice", sha, "threshold"),
        user_id="alice",
        trigger="threshold",
        dataset=DatasetRef(uri="file:///x/user_alice_finetune.jsonl", sha256=sha, example_counts={"correction": 3}),
        lineage=[OffsetRange(topic="interactions.feedback", partition=0, first_offset=0, last_offset=9)],
    )
    return TrainingRequest(**(data | overrides))


def test_commands_are_told_apart_by_type():
    raw = json.dumps({"type": "rollback", "command_id": "c1", "user_id": "alice", "reason": "bad answers"}).encode()
    command = decode(COMMAND_ADAPTER, raw)
    assert isinstance(command, RollbackCommand) and command.to_version is None
    with pytest.raises(InvalidMessage, match="type"):
        decode(COMMAND_ADAPTER, json.dumps({"type": "explode", "command_id": "c1", "user_id": "alice"}).encode())


def test_training_request_round_trip_and_deterministic_id():
    request = _request()
    assert decode(TrainingRequest, request.to_bytes()) == request
    assert request_id_for("alice", "a" * 64, "threshold") == request.request_id
    assert request_id_for("bob", "a" * 64, "threshold") != request.request_id
    with pytest.raises(ValidationError, match="user_id"):
        _request(user_id="../bob")


def test_lifecycle_and_dead_letter_round_trip():
    event = LifecycleEvent(event_id="ev1", type="promoted", user_id="alice", version=2, metrics={"score": 0.9})
    assert decode(LifecycleEvent, event.to_bytes()) == event
    letter = DeadLetter.of(
        topic="t", partition=1, offset=5, key=b"k", value=b"\xff\x00raw", reason="not UTF-8", redactor=DISABLED, keep_raw=True
    )
    again = decode(DeadLetter, letter.to_bytes())
    assert again.original_value() == b"\xff\x00raw" and again.reason == "not UTF-8"


def test_a_dead_letter_keeps_a_redacted_preview_and_no_raw_bytes_unless_asked():
    raw = b'{"query": "mail ana@example.org", "card": "4111 1111 1111 1111"}'
    reason = "bad field: input_value='ana@example.org'"
    letter = DeadLetter.of(
        topic="t", partition=0, offset=3, key=b"k", value=raw, reason=reason, redactor=Redactor(), keep_raw=False
    )
    again = decode(DeadLetter, letter.to_bytes())
    assert again.value_b64 is None and again.original_value() is None
    assert again.preview == '{"query": "mail <EMAIL>", "card": "<CARD>"}' and again.reason == "bad field: input_value='<EMAIL>'"
    assert again.value_sha256 == hashlib.sha256(raw).hexdigest() and again.value_bytes == len(raw)
    assert b"ana@example.org" not in letter.to_bytes() and b"4111" not in letter.to_bytes()


def test_training_example_defaults_and_bounds():
    example = TrainingExample(prompt="q", response="a")
    assert example.weight == 1.0
    with pytest.raises(ValidationError, match="weight"):
        TrainingExample(prompt="q", response="a", weight=0)


def test_exported_schemas_validate_real_messages(tmp_path):
    paths = export_json_schemas(tmp_path)
    assert {p.name for p in paths} == {f"{name}.schema.json" for name in MESSAGE_TYPES}
    schema = json.loads((tmp_path / "training_request.schema.json").read_text())
    jsonschema.validate(json.loads(_request().to_bytes()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"user_id": "alice"}, schema)
    intent = json.loads((tmp_path / "intent_trace.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            {
                "event_id": "e",
                "user_id": "a",
                "timestamp": "2026-01-01T00:00:00Z",
                "intent": "i",
                "status": "missed",
                "query": "q",
                "extra": 1,
            },
            intent,
        )


def test_a_dead_letter_of_a_huge_message_still_fits_on_the_topic():
    from schemas.deadletter import MAX_KEPT_BYTES

    junk = b"\xfe" * 900_000  # just under the broker's 1 MB limit
    kept = {"redactor": DISABLED, "keep_raw": True}
    letter = DeadLetter.of(topic="t", partition=0, offset=7, key=b"k" * 5000, value=junk, reason="too large", **kept)
    assert len(letter.to_bytes()) < 500_000
    again = decode(DeadLetter, letter.to_bytes(), max_bytes=1_000_000)
    assert again.value_truncated and again.value_bytes == 900_000 and again.original_value() == junk[:MAX_KEPT_BYTES]
    assert again.value_sha256 == hashlib.sha256(junk).hexdigest()
    small = DeadLetter.of(topic="t", partition=0, offset=8, key=None, value=b"{", reason="not JSON", **kept)
    assert not small.value_truncated and small.original_value() == b"{" and small.value_bytes == 1
