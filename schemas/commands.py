"""Commands on `adapter.commands`: retrain, validate, roll back, approve or deny a review, consent and forget.

Published by the API and the CLI, keyed by `user_id`; `type` tells them apart.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from schemas.common import EventId, Message, ShortText, Text, Timestamp, UserId, utc_now
from schemas.privacy import USER_HASH_PATTERN
from schemas.review import ReviewId

CommandType = Literal["retrain", "validate", "rollback", "approve", "deny"]


class _Command(Message):
    command_id: EventId
    user_id: UserId
    requested_at: Timestamp = Field(default_factory=utc_now)
    requested_by: ShortText = "cli"


class RetrainCommand(_Command):
    type: Literal["retrain"] = "retrain"
    trigger: ShortText = "on-demand"
    include_global: bool = False


class ValidateCommand(_Command):
    type: Literal["validate"] = "validate"
    version: int = Field(ge=1)
    baseline_version: int | None = Field(None, ge=1)


class RollbackCommand(_Command):
    type: Literal["rollback"] = "rollback"
    reason: Text
    to_version: int | None = Field(None, ge=1, description="default: the previous good version")


class ApproveCommand(_Command):
    """Approve a pending review (schemas/review.py): its version becomes active; `user_id` is the review's user."""

    type: Literal["approve"] = "approve"
    review_id: ReviewId
    reason: Text | None = None


class DenyCommand(_Command):
    """Deny a pending review: its version never becomes active."""

    type: Literal["deny"] = "deny"
    review_id: ReviewId
    reason: Text


class ConsentCommand(_Command):
    """A user's standing choice: `train` false opts out of training (pending examples dropped) until true again."""

    type: Literal["consent"] = "consent"
    train: bool


class ForgetCommand(_Command):
    """Erase the user from the worker's state (privacy/forget.py sends it after the store is cleaned).

    `requested_at` is the forget time: the user's events, commands and
    lifecycle events stamped at or before it are ignored from now on, also
    when they are replayed; later ones start a new history from nothing.
    """

    type: Literal["forget"] = "forget"
    user_hash: str = Field(pattern=USER_HASH_PATTERN, description="the salted hash the worker keeps instead of the id")


Command = Annotated[
    RetrainCommand | ValidateCommand | RollbackCommand | ApproveCommand | DenyCommand | ConsentCommand | ForgetCommand,
    Field(discriminator="type"),
]
