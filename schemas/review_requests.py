"""Labelling tasks on `adapter.review-requests`: the worker asks a user for an answer worth learning.

Keyed by `user_id`. The worker (streams/active.py) ranks each user's
unresolved questions (missed or abandoned intents without a resolution,
answers given with low confidence, answers rated down, user-suite cases the
newly promoted version fails) by how often the user
asks, how recently and how unsure the assistant was, and opens a task for the
best ones within a daily budget. The same record type says how a task ends:
`status` is `open` when it is emitted, then `answered` (a correction with
this `review_request_id` came, curated like any correction) or `expired`
(none came within `active_learning.task_ttl_h`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.common import EventId, Message, ShortText, Text, Timestamp, UserId

ReviewRequestStatus = Literal["open", "answered", "expired"]
UnresolvedKind = Literal["missed_intent", "low_confidence", "negative_rating", "failed_case"]


class ReviewRequest(Message):
    review_request_id: EventId
    user_id: UserId
    status: ReviewRequestStatus = "open"
    question: Text = Field(description="what to ask the user for the right answer to (personal data redacted)")
    kind: UnresolvedKind
    intent: ShortText | None = None
    asked: int = Field(ge=1, description="how often the user asked it")
    uncertainty: float = Field(ge=0, le=1, description="how unsure the assistant was (1 - its confidence)")
    value: float = Field(ge=0, description="the expected value the task was ranked by")
    created_at: Timestamp
    expires_at: Timestamp
    closed_at: Timestamp | None = None
