"""Input events: what upstream services publish to the `interactions.*` topics.

Each is plain UTF-8 JSON keyed by `user_id`, with `event_id` (unique),
`user_id`, `timestamp` (ISO-8601) and an optional `schema_version`. The field
names are a contract with producers; see README.md for examples.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from schemas.common import (
    SCHEMA_VERSION,
    EventId,
    Message,
    Probability,
    ShortText,
    Text,
    Timestamp,
    UserId,
    normalise_rating,
)

RatingScale = Literal["unit", "stars"]
Consent = Literal["train", "no-train"]
IntentStatus = Literal["open", "missed", "satisfied", "abandoned"]
FeedbackKind = Literal["correction", "rating"]


class InputEvent(Message):
    event_id: EventId
    user_id: UserId
    timestamp: Timestamp
    schema_version: int = Field(SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)
    consent: Consent | None = Field(
        None, description="'no-train': validated and counted, never trained on (absent: the user's standing choice)"
    )


class _Rated(InputEvent):
    """An event that may carry a rating; see `schemas.common.normalise_rating`."""

    rating: float | None = Field(None, allow_inf_nan=False, description="-1..1 or 1..5 (see rating_scale)")
    rating_scale: RatingScale | None = Field(None, description="'unit' (-1..1) or 'stars' (1..5); inferred if absent")

    @model_validator(mode="after")
    def _rating_in_scale(self) -> _Rated:
        if self.rating is not None:
            normalise_rating(self.rating, self.rating_scale)
        elif self.rating_scale is not None:
            raise ValueError("rating_scale given without a rating")
        return self

    @property
    def normalized_rating(self) -> float | None:
        """The rating on -1..1, or None when unrated."""
        return None if self.rating is None else normalise_rating(self.rating, self.rating_scale)


class IntentTrace(InputEvent):
    """An assistant's attempt at a user intent, and how it ended."""

    intent: ShortText
    status: IntentStatus
    query: Text
    response: Text | None = None
    resolution: Text | None = Field(None, description="the right answer, when known")
    confidence: Probability | None = None
    session_id: ShortText | None = None


class Feedback(_Rated):
    """A user's correction of an answer, or their rating of it."""

    kind: FeedbackKind
    query: Text
    response: Text
    correction: Text | None = Field(None, description="required when kind is 'correction'")
    comment: Text | None = None
    review_request_id: EventId | None = Field(
        None, description="the labelling task this correction answers (adapter.review-requests)"
    )

    @model_validator(mode="after")
    def _kind_has_its_field(self) -> Feedback:
        if self.kind == "correction" and self.correction is None:
            raise ValueError("a correction needs the 'correction' field")
        if self.kind == "rating" and self.rating is None:
            raise ValueError("a rating needs the 'rating' field")
        return self


class ConversationTurn(_Rated):
    """One question and answer of a conversation, optionally rated."""

    session_id: ShortText
    question: Text
    answer: Text


class ConceptGap(InputEvent):
    """A concept the assistant did not know; `user_id` may be `global`."""

    concept: ShortText
    related: list[ShortText] = Field(default_factory=list, max_length=20)
    description: Text
    confidence: Probability | None = None


AnyInputEvent = IntentTrace | Feedback | ConversationTurn | ConceptGap

# Which event type each input topic carries, by the topic's settings key.
EVENT_TYPE_BY_INPUT_KIND: dict[str, type[InputEvent]] = {
    "intent_traces": IntentTrace,
    "feedback": Feedback,
    "conversations": ConversationTurn,
    "concept_gaps": ConceptGap,
}
