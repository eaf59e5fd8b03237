"""Per-user state kept in the worker's changelog-backed table, and how events change it.

One table value per user, written once per batch. Everything here is a plain
function of (state, input), so tests and `generate-data` use it without Kafka.
Idempotence: an `event_id` already in `seen` changes nothing, so a redelivered
or republished event is counted once.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from pydantic import BaseModel, Field

from schemas.training import TrainingExample
from streams.curation import GAP_KINDS, CurationConfig, Curated, apply_boost, augment, dedupe


class OpenRequest(BaseModel):
    request_id: str
    at: float
    trigger: str
    command_id: str | None = None
    include_global: bool = False
    dataset_uri: str | None = None


class DeferredCommand(BaseModel):
    command_id: str
    include_global: bool = False
    at: float


class UserState(BaseModel):
    """Everything the worker knows about one user (JSON in the table)."""

    seen: dict[str, float] = Field(default_factory=dict, description="event_id -> event time, insertion ordered")
    gap_totals: dict[str, int] = Field(default_factory=lambda: {k: 0 for k in GAP_KINDS})
    gaps: list[tuple[float, str]] = Field(default_factory=list, description="gaps since the last request")
    events_total: int = 0
    pending: list[TrainingExample] = Field(default_factory=list, description="new examples since the last request")
    pending_dropped: int = 0
    outcomes: list[int] = Field(default_factory=list, description="last N outcomes, 1 good / 0 bad")
    accuracy_alarm: bool = False
    last_event_at: float = 0.0
    last_request_at: float | None = None
    open_request: OpenRequest | None = None
    deferred: DeferredCommand | None = None
    requests_total: int = 0
    last_dataset_uri: str | None = None

    @classmethod
    def load(cls, raw: Any) -> "UserState":
        return cls() if raw is None else cls.model_validate(raw)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def gaps_in_window(state: UserState, now: float, window_s: float) -> int:
    return sum(1 for ts, _ in state.gaps if ts > now - window_s)


def accuracy(state: UserState) -> float | None:
    return sum(state.outcomes) / len(state.outcomes) if state.outcomes else None


def apply_event(
    state: UserState,
    event_id: str,
    event_time: float,
    curated: Curated,
    cfg: CurationConfig,
    *,
    dedupe_max_ids: int,
    max_pending: int,
    accuracy_window: int,
) -> bool:
    """Apply one event's curation to `state` in place; False when it was a duplicate."""
    if event_id in state.seen:
        return False
    state.seen[event_id] = event_time
    if len(state.seen) > dedupe_max_ids:
        # Forget the oldest ids first; redeliveries come soon after the original.
        ordered = OrderedDict(state.seen)
        while len(ordered) > dedupe_max_ids:
            ordered.popitem(last=False)
        state.seen = dict(ordered)
    state.events_total += 1
    state.last_event_at = max(state.last_event_at, event_time)
    if curated.gap is not None:
        state.gap_totals[curated.gap] = state.gap_totals.get(curated.gap, 0) + 1
        state.gaps.append((event_time, curated.gap))
    if curated.outcome is not None:
        state.outcomes.append(1 if curated.outcome else 0)
        del state.outcomes[:-accuracy_window]
    if curated.boost_prompt is not None:
        state.pending = apply_boost(state.pending, curated.boost_prompt, cfg.positive_rating_boost)
    if curated.examples and not curated.to_global:
        state.pending = dedupe(state.pending + augment(list(curated.examples), cfg.paraphrases, cfg.seed))
        overflow = len(state.pending) - max_pending
        if overflow > 0:
            state.pending_dropped += overflow
            del state.pending[:overflow]
    return True


def prune_gaps(state: UserState, now: float, window_s: float) -> None:
    state.gaps = [(ts, kind) for ts, kind in state.gaps if ts > now - window_s]
