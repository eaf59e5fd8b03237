"""Lifecycle events on `adapter.lifecycle`: what happened to a user's adapter.

A job's events, in order: `training_started`, `training_progress` (about every
tenth of the steps, then once as the gate starts), `training_completed`,
`validated`, then `promoted` or `rejected`; or `training_skipped` alone (the
request held nothing new), or `training_failed`. In review mode
(`promotion.mode: review`) a candidate that passed the gate is
`awaiting_review` instead of `promoted`; later `approved` then `promoted`
(a person, or `review.on_timeout`), or `denied` (a person, the timeout, or a
newer candidate that superseded it).

Which events end what is part of the contract, so it is stated here once:
`ENDS_REQUEST` (a training request is answered: the worker closes the user's
open request), `ENDS_COMMAND` (what a CLI or API caller waits for, per
command type).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from schemas.common import MAX_TEXT_CHARS, EventId, Message, ShortText, Text, Timestamp, UserId, utc_now

LifecycleType = Literal[
    "training_started",
    "training_progress",  # while a job runs: details {"phase": "training", "step", "total", "loss"} or {"phase": "gating"}
    "training_skipped",  # a request with nothing new to learn, ended before any training; `reason` says why
    "training_completed",
    "training_failed",
    "validated",
    "promoted",
    "rejected",
    "rolled_back",
    "awaiting_review",  # passed the gate, waits for a person: details {"review_id"}
    "approved",  # a review approved: `promoted` follows; details {"review_id", "decided_by"}
    "denied",  # a review denied: `reason` says why; details {"review_id", "decided_by", "superseded_by"?}
    "command_failed",  # a validate or rollback command that could not be carried out; `reason` says why
    "forgotten",  # a user erased: `user_id` is the salted hash (schemas.privacy), never the id
]

# A `promoted` event's `details.missed_cases` lists the user-suite questions the
# version does not answer right (the worker may ask the user about them).

# A training request is answered by any of these (the version's verdict, a skip, or the failure).
ENDS_REQUEST: frozenset[str] = frozenset(
    {"training_completed", "training_skipped", "training_failed", "promoted", "rejected", "awaiting_review"}
)

# What ends each kind of command, for whoever waits on it.
ENDS_COMMAND: dict[str, frozenset[str]] = {
    "retrain": frozenset({"promoted", "rejected", "awaiting_review", "training_skipped", "training_failed", "command_failed"}),
    "validate": frozenset({"validated", "command_failed"}),
    "rollback": frozenset({"rolled_back", "command_failed"}),
    "approve": frozenset({"promoted", "command_failed"}),
    "deny": frozenset({"denied", "command_failed"}),
}


def reason_text(text: str) -> str:
    """`text` cut to fit an event's `reason` (error messages can be longer than the field allows)."""
    return text if len(text) <= MAX_TEXT_CHARS else text[: MAX_TEXT_CHARS - 1] + "…"


class LifecycleEvent(Message):
    event_id: EventId
    type: LifecycleType
    user_id: UserId
    timestamp: Timestamp = Field(default_factory=utc_now)
    request_id: str | None = Field(None, max_length=64)
    job_id: ShortText | None = Field(None, description="the API job or command id this belongs to")
    version: int | None = Field(None, ge=1)
    previous_version: int | None = Field(None, ge=1)
    metrics: dict[str, float] = Field(default_factory=dict)
    reason: Text | None = None
    details: dict[str, Any] = Field(default_factory=dict)
