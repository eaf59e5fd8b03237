"""Commands on `adapter.commands`: retrain, validate and roll back requests.

Published by the API and the CLI, keyed by `user_id`; `type` tells them apart.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from schemas.common import EventId, Message, ShortText, Text, Timestamp, UserId, utc_now

CommandType = Literal["retrain", "validate", "rollback"]


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


class ConsentCommand(_Command):
    """A user's standing choice: `train` false opts out of training (pending examples dropped) until true again."""

    type: Literal["consent"] = "consent"
    train: bool


Command = Annotated[RetrainCommand | ValidateCommand | RollbackCommand | ConsentCommand, Field(discriminator="type")]
