"""A review: a person's decision on a candidate that passed the gate (`promotion.mode: review`).

The registry keeps one line per change of a review in `reviews.jsonl`
(trainer/registry.py); the newest line of a review is its state. The CLI
(`adaptloop review`), the API (`/api/adapter/reviews`) and the dashboard show
these records; `approve` and `deny` commands (schemas/commands.py) name a
review by its `review_id`.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from schemas.common import Message, ShortText, Text, Timestamp, UserId

REVIEW_ID_PATTERN = r"^r-[0-9a-f]{12}$"
ReviewId = Annotated[str, StringConstraints(pattern=REVIEW_ID_PATTERN)]

ReviewStatus = Literal["pending", "approved", "denied"]


def review_id_of(user_id: str, version: int, registered_at: datetime | None) -> str:
    """A version's review ID: the same for every attempt to open it (a redelivered request opens no second review)."""
    stamp = registered_at.isoformat() if registered_at is not None else ""
    return "r-" + hashlib.sha256(f"{user_id}\0{version}\0{stamp}".encode()).hexdigest()[:12]


class Review(Message):
    review_id: ReviewId
    user_id: UserId
    version: int = Field(ge=1)
    status: ReviewStatus = "pending"
    opened_at: Timestamp
    request_id: str | None = Field(None, max_length=64)
    opened_because: Text | None = Field(None, description="why it waits: review mode, or contradictions of the base model")
    decided_at: Timestamp | None = None
    decided_by: ShortText | None = Field(None, description="who decided: 'cli', 'api:<token id>', 'timeout', 'superseded'")
    reason: Text | None = None
    superseded_by: int | None = Field(None, ge=1, description="the newer version that replaced this one")
    command_id: str | None = Field(None, max_length=128, description="the approve or deny command that decided it")

    @property
    def pending(self) -> bool:
        return self.status == "pending"
