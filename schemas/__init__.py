"""Pydantic v2 models for every message adaptloop reads or writes.

One module per topic family: `events` (inputs), `commands`, `training`,
`lifecycle`, `deadletter`; the artifacts two sides share: `dataset` (the
dataset line format, the held-out split, the dataset manifest) and
`manifest` (the adapter manifest); `common` holds the shared field types and
rules, `decode` turns raw bytes into models with a reason on failure.
`adaptloop schemas export DIR` writes a JSON Schema per message type.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, TypeAdapter

from schemas.commands import (
    ApproveCommand,
    Command,
    ConsentCommand,
    DenyCommand,
    ForgetCommand,
    RetrainCommand,
    RollbackCommand,
    ValidateCommand,
)
from schemas.common import SCHEMA_VERSION, check_user_id, model_json_schema
from schemas.deadletter import DeadLetter
from schemas.decode import decode
from schemas.events import ConceptGap, ConversationTurn, Feedback, InputEvent, IntentTrace
from schemas.lifecycle import ENDS_COMMAND, ENDS_REQUEST, LifecycleEvent, reason_text
from schemas.manifest import AdapterManifest
from schemas.privacy import ForgottenRecord
from schemas.review import Review
from schemas.review_requests import ReviewRequest
from schemas.training import DatasetRef, TrainingExample, TrainingRequest

# Every message type, by the name its JSON Schema file carries.
MESSAGE_TYPES: dict[str, type[BaseModel]] = {
    "intent_trace": IntentTrace,
    "feedback": Feedback,
    "conversation_turn": ConversationTurn,
    "concept_gap": ConceptGap,
    "retrain_command": RetrainCommand,
    "validate_command": ValidateCommand,
    "rollback_command": RollbackCommand,
    "approve_command": ApproveCommand,
    "deny_command": DenyCommand,
    "consent_command": ConsentCommand,
    "forget_command": ForgetCommand,
    "forgotten_record": ForgottenRecord,
    "training_request": TrainingRequest,
    "training_example": TrainingExample,
    "lifecycle_event": LifecycleEvent,
    "review": Review,
    "review_request": ReviewRequest,
    "dead_letter": DeadLetter,
}

COMMAND_ADAPTER: TypeAdapter = TypeAdapter(Command)


def export_json_schemas(directory: Path) -> list[Path]:
    """Write `<name>.schema.json` for every message type; return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in MESSAGE_TYPES.items():
        path = directory / f"{name}.schema.json"
        schema = model_json_schema(model)
        schema["$id"] = f"https://adaptloop.dev/schemas/v{SCHEMA_VERSION}/{name}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(path)
    return written


__all__ = [
    "COMMAND_ADAPTER",
    "ApproveCommand",
    "DenyCommand",
    "Review",
    "ReviewRequest",
    "ENDS_COMMAND",
    "ENDS_REQUEST",
    "AdapterManifest",
    "MESSAGE_TYPES",
    "Command",
    "ConceptGap",
    "ConversationTurn",
    "DatasetRef",
    "DeadLetter",
    "Feedback",
    "InputEvent",
    "IntentTrace",
    "LifecycleEvent",
    "ConsentCommand",
    "ForgetCommand",
    "ForgottenRecord",
    "RetrainCommand",
    "RollbackCommand",
    "TrainingExample",
    "TrainingRequest",
    "ValidateCommand",
    "check_user_id",
    "decode",
    "export_json_schemas",
    "reason_text",
]
