"""Training data and requests: dataset lines and `adapter.training-requests`."""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import Field

from schemas.common import EventId, Message, ShortText, Text, Timestamp, UserId, utc_now

Trigger = Literal["threshold", "nightly", "on-demand", "continuous", "accuracy-drop"]
ExampleSource = Literal["intent", "correction", "conversation", "concept", "global", "replay", "manual", "anchor", "rating"]


class Provenance(Message):
    """Where an example came from: the event's topic, partition and offset."""

    topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class TrainingExample(Message):
    """One line of a dataset JSONL file (the streams side writes, the trainer reads)."""

    prompt: Text
    response: Text
    source: ExampleSource = "manual"
    weight: float = Field(1.0, gt=0.0, le=10.0, allow_inf_nan=False)
    event_id: EventId | None = None
    provenance: Provenance | None = None
    wording: str | None = Field(
        None,
        pattern=r"^[a-z-]{1,32}$",
        description="how the prompt rewords the taught question (template, contraction, name, ...; none: as asked)",
    )
    # What a preference objective learns from (trainer/preference.py), beside the supervised target above:
    rejected: Text | None = Field(None, description="the answer the user corrected: `response` is preferred to it (a pair)")
    rating: float | None = Field(
        None, ge=-1.0, le=1.0, allow_inf_nan=False, description="the user's rating of `response`, -1..1 (an unpaired signal)"
    )

    @property
    def rated_answer(self) -> bool:
        """The assistant's own answer as rated (source `rating`): judged by preference, never a taught fact to recall."""
        return self.source == "rating"

    @property
    def preference(self) -> bool:
        """Whether a preference objective learns from it: a pair, or a rated answer."""
        return self.rejected is not None or (self.rating is not None and self.rating != 0)


class BatchEntry(Message):
    """One line of `adaptloop train --batch FILE.jsonl`: a user and the dataset to train that user's next version on."""

    user_id: UserId
    data_path: str = Field(min_length=1, max_length=4096)


class OffsetRange(Message):
    """The events a dataset was built from, per topic partition (inclusive)."""

    topic: str
    partition: int = Field(ge=0)
    first_offset: int = Field(ge=0)
    last_offset: int = Field(ge=0)


class DatasetRef(Message):
    uri: str = Field(min_length=1, max_length=2000)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    example_counts: dict[str, int] = Field(default_factory=dict, description="training examples per source")
    test_uri: str | None = Field(None, description="the held-out split, never trained on")
    test_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    test_count: int = Field(0, ge=0)


class TrainingRequest(Message):
    request_id: str = Field(pattern=r"^[0-9a-f]{16,64}$")
    user_id: UserId
    trigger: Trigger
    created_at: Timestamp = Field(default_factory=utc_now)
    dataset: DatasetRef
    lineage: list[OffsetRange] = Field(default_factory=list)
    include_global: bool = False
    command_id: EventId | None = Field(None, description="the retrain command that asked for it, if any")
    note: ShortText | None = None


def request_id_for(user_id: str, dataset_sha256: str, trigger: str) -> str:
    """A deterministic request id: the same user, data and trigger give the same id.

    Redelivered or re-emitted requests therefore dedupe by id downstream.
    """
    return hashlib.sha256(f"{user_id}\n{dataset_sha256}\n{trigger}".encode()).hexdigest()[:32]
