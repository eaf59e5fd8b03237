"""Request and response bodies of the HTTP API (unknown fields are refused with a 422)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from schemas.common import ShortText, Text, UserId


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetrainBody(_Body):
    user_id: UserId
    trigger: ShortText = "on-demand"
    include_global: bool = False


class ValidateBody(_Body):
    user_id: UserId
    version: int = Field(ge=1)
    baseline_version: int | None = Field(None, ge=1)


class RollbackBody(_Body):
    user_id: UserId
    reason: Text
    to_version: int | None = Field(None, ge=1)


class ApproveBody(_Body):
    reason: Text | None = None


class DenyBody(_Body):
    reason: Text


class PromotionModeBody(_Body):
    mode: Literal["auto", "review"] | None = Field(description="null: the configured promotion.mode applies again")


class PromotionMode(BaseModel):
    user_id: str
    mode: str = Field(description="the mode that applies to the user now")
    own: str | None = Field(description="the user's own mode, when set (it wins over the configured one)")


class ConsentBody(_Body):
    train: StrictBool  # "no" or 0 is a mistake to report, not a choice to guess


class ConsentAccepted(BaseModel):
    user_id: str
    train: bool
    command_id: str
    status: str = "sent"  # the worker applies it; GET status/{user_id} shows `training_consent` once it has


class JobAccepted(BaseModel):
    job_id: str
    status: str = "queued"
