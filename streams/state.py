"""Per-user state, and how events change it. Plain functions; storage is pluggable.

A user's state has two parts:
- `UserState`, small and fixed-size: counters, the gaps since the last
  request, recent outcomes, the open request. One table value per user,
  written once per batch.
- a `UserLog`: the event ids already counted (for idempotence) and the pending
  examples, one entry per event or example. In the worker these are table
  entries of their own, so a batch writes O(events) bytes to the changelogs,
  not O(everything the user ever sent).

Idempotence: an event id the log has seen changes nothing, so a redelivered or
republished event is counted once.
"""

from __future__ import annotations

import bisect
from typing import Any, Protocol

from pydantic import BaseModel, Field, field_validator

from core.settings import CurationSettings
from schemas.training import TrainingExample
from streams.active import Unresolved
from streams.curation import GAP_KINDS, Curated


class OpenRequest(BaseModel):
    request_id: str
    at: float
    trigger: str
    command_id: str | None = None
    include_global: bool = False
    dataset_uri: str | None = None
    message: str | None = Field(None, description="the request as sent (JSON), to send again if a crash may have lost it")


class DeferredCommand(BaseModel):
    command_id: str
    include_global: bool = False
    at: float


class UserState(BaseModel):
    """Everything fixed-size the worker knows about one user (JSON in the table)."""

    gap_totals: dict[str, int] = Field(default_factory=lambda: {k: 0 for k in GAP_KINDS})
    gaps: list[tuple[float, str]] = Field(
        default_factory=list, description="gaps since the last request, in the window (the newest min_gap_events of them)"
    )
    events_total: int = 0
    batch_ids: list[str] = Field(
        default_factory=list,
        description="event ids the last write counted, whose marks a crash may have lost (see UserProcessor.handle)",
    )
    written_by: str | None = Field(None, description="the worker run that wrote this state last")
    request_unsent: bool = Field(False, description="the last write opened `open_request`, which is sent after the state")
    pending_first: int = Field(0, description="sequence number of the oldest pending example")
    pending_next: int = Field(0, description="sequence number the next pending example gets")
    pending_dropped: int = 0
    outcomes: list[int] = Field(default_factory=list, description="last N outcomes, 1 good / 0 bad")
    accuracy_alarm: bool = False
    last_event_at: float = 0.0
    last_request_at: float | None = None
    open_request: OpenRequest | None = None
    deferred: DeferredCommand | None = None
    requests_total: int = 0
    last_dataset_uri: str | None = None
    promoted_version: int | None = Field(None, description="the last promoted version, while a drop may still roll it back")
    promoted_at: float | None = None
    training_consent: bool = Field(True, description="False while the user has opted out of training (a consent command)")
    unresolved: list[Unresolved] = Field(
        default_factory=list, description="questions still without a right answer, and their labelling tasks (streams/active.py)"
    )
    tasks_day: str | None = Field(None, description="the UTC day (event time) `tasks_used` counts")
    tasks_used: int = 0

    @field_validator("gaps")
    @classmethod
    def _in_time_order(cls, gaps: list[tuple[float, str]]) -> list[tuple[float, str]]:
        return sorted(gaps)  # states written before gaps were kept in order

    @property
    def pending_count(self) -> int:
        return self.pending_next - self.pending_first

    @classmethod
    def load(cls, raw: Any) -> UserState:
        return cls() if raw is None else cls.model_validate(raw)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class UserLog(Protocol):
    """One user's counted event ids and pending examples (a table in the worker, dicts elsewhere)."""

    def seen(self, event_id: str) -> bool: ...
    def mark_seen(self, event_id: str, at: float) -> None: ...
    def get_example(self, seq: int) -> TrainingExample | None: ...
    def put_example(self, seq: int, example: TrainingExample) -> None: ...
    def drop_example(self, seq: int) -> None: ...


class MemoryUserLog:
    """A `UserLog` in plain dicts: for tests and `generate-data`."""

    def __init__(self) -> None:
        self.seen_ids: dict[str, float] = {}
        self.examples: dict[int, TrainingExample] = {}

    def seen(self, event_id: str) -> bool:
        return event_id in self.seen_ids

    def mark_seen(self, event_id: str, at: float) -> None:
        self.seen_ids[event_id] = at

    def get_example(self, seq: int) -> TrainingExample | None:
        return self.examples.get(seq)

    def put_example(self, seq: int, example: TrainingExample) -> None:
        self.examples[seq] = example

    def drop_example(self, seq: int) -> None:
        self.examples.pop(seq, None)


_AFTER_EVERY_KIND = "\U0010ffff"  # sorts after every gap kind: (t, it) comes after each (t, kind)


def _first_in_window(state: UserState, now: float, window_s: float) -> int:
    """Index of the first gap inside the window (`state.gaps` is kept in time order)."""
    return bisect.bisect_right(state.gaps, (now - window_s, _AFTER_EVERY_KIND))


def gaps_in_window(state: UserState, now: float, window_s: float) -> int:
    return len(state.gaps) - _first_in_window(state, now, window_s)


def accuracy(state: UserState) -> float | None:
    return sum(state.outcomes) / len(state.outcomes) if state.outcomes else None


def pending_examples(state: UserState, log: UserLog) -> list[TrainingExample]:
    return [e for seq in range(state.pending_first, state.pending_next) if (e := log.get_example(seq)) is not None]


def add_pending(state: UserState, log: UserLog, examples: list[TrainingExample], max_pending: int) -> None:
    for example in examples:
        log.put_example(state.pending_next, example)
        state.pending_next += 1
    while state.pending_count > max_pending:
        log.drop_example(state.pending_first)
        state.pending_first += 1
        state.pending_dropped += 1


def clear_pending(state: UserState, log: UserLog) -> None:
    for seq in range(state.pending_first, state.pending_next):
        log.drop_example(seq)
    state.pending_first = state.pending_next


def apply_event(
    state: UserState,
    log: UserLog,
    event_id: str,
    event_time: float,
    curated: Curated,
    cfg: CurationSettings,
    *,
    max_pending: int,
    accuracy_window: int,
) -> bool:
    """Apply one event's curation to `state`; False when it was counted before."""
    if log.seen(event_id):
        return False
    log.mark_seen(event_id, event_time)
    state.batch_ids.append(event_id)
    state.events_total += 1
    state.last_event_at = max(state.last_event_at, event_time)
    if curated.gap is not None:
        state.gap_totals[curated.gap] = state.gap_totals.get(curated.gap, 0) + 1
        bisect.insort(state.gaps, (event_time, curated.gap))  # in time order, whatever order events come in
    if curated.outcome is not None:
        state.outcomes.append(1 if curated.outcome else 0)
        del state.outcomes[:-accuracy_window]
    if curated.boost_prompt is not None:
        key = curated.boost_prompt.strip().casefold()
        for seq in range(state.pending_first, state.pending_next):
            example = log.get_example(seq)
            if example is not None and example.source == "conversation" and example.prompt.strip().casefold() == key:
                boosted = round(min(example.weight * (1.0 + cfg.positive_rating_boost), 10.0), 6)
                log.put_example(seq, example.model_copy(update={"weight": boosted}))
    if curated.examples and not curated.to_global:
        # Paraphrasing and dedupe happen once, at snapshot time.
        add_pending(state, log, list(curated.examples), max_pending)
    return True


def prune_gaps(state: UserState, now: float, window_s: float, keep: int) -> None:
    """Gaps outside the window dropped, and all but the newest `keep` (`min_gap_events`).

    The newest `min_gap_events` gaps alone decide the threshold trigger (it
    fires when all of them lie in the window), so the state stays the same
    size however many gaps a user has while a request is out.
    """
    first = max(_first_in_window(state, now, window_s), len(state.gaps) - keep)
    if first > 0:
        del state.gaps[:first]
