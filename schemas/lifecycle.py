"""Lifecycle events on `adapter.lifecycle`: what happened to a user's adapter."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from schemas.common import EventId, Message, ShortText, Text, Timestamp, UserId, utc_now

LifecycleType = Literal[
    "training_started",
    "training_completed",
    "training_failed",
    "validated",
    "promoted",
    "rejected",
    "rolled_back",
    "command_failed",  # a validate or rollback command that could not be carried out; `reason` says why
]


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
