"""Active learning: ask a user for the answers worth most, instead of waiting for corrections.

Per user, the worker keeps the questions still without a right answer
(`UserState.unresolved`, at most `max_tracked`): a missed or abandoned intent
without a resolution, an answer given with confidence below `low_confidence`,
an answer rated down, a user-suite case the newly promoted version fails (the
`promoted` event's `details.missed_cases`; counted as asked `min_asks` times,
so it is worth a task at once). The same question asked again (the same words, ignoring
case and punctuation) counts again. A correction of it, or a resolution,
removes it.

Each question's worth, the expected value of learning its answer:

    asked x uncertainty x 0.5 ** (hours since last asked / recency_half_life_h)

how often the user asks it, how unsure the assistant was (1 - confidence; 1
when it missed or was rated down), and how recently. At the end of each of
a user's batches, the questions asked at least `min_asks` times and without
an open task are taken best first, up to what is left of the user's
`daily_budget` (a UTC day of event time), and become labelling tasks on
`adapter.review-requests` (schemas/review_requests.py). A task is open until
a correction carrying its `review_request_id` answers it (curated like any
correction: it counts toward training) or until `task_ttl_h` passes
(expired: the question may be asked again later). Task IDs derive from the
user, the question and the moment, so a batch processed again (after a
crash, or by `adaptloop replay`) opens the very same task.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import BaseModel

from core.settings import ActiveLearningSettings
from schemas.review_requests import ReviewRequest, UnresolvedKind
from streams.curation import Asked, Curated

_WORD = re.compile(r"[^\W_]+")


class Unresolved(BaseModel):
    """A question of the user's still without a right answer (in the user's state)."""

    key: str
    question: str
    kind: UnresolvedKind
    intent: str | None = None
    asked: int = 1
    last_at: float
    uncertainty: float = 1.0
    task_id: str | None = None
    task_created_at: float | None = None
    task_expires_at: float | None = None


@dataclass(frozen=True)
class Closed:
    """A task that ended: answered by a correction, or expired."""

    entry: Unresolved
    status: str  # answered | expired
    at: float


def question_key(question: str) -> str:
    """The same question in other case or punctuation has the same key."""
    return " ".join(w.casefold() for w in _WORD.findall(question))


def worth(entry: Unresolved, now: float, cfg: ActiveLearningSettings) -> float:
    hours = max(0.0, now - entry.last_at) / 3600
    return entry.asked * entry.uncertainty * 0.5 ** (hours / cfg.recency_half_life_h)


def _kind_and_uncertainty(asked: Asked, cfg: ActiveLearningSettings) -> tuple[UnresolvedKind, float] | None:
    confidence = asked.confidence
    if asked.kind == "answered":
        if confidence is None or confidence >= cfg.low_confidence:
            return None  # answered with confidence: nothing to ask
        return "low_confidence", 1.0 - confidence
    return asked.kind, 1.0 if confidence is None else 1.0 - confidence


def note_missed_cases(unresolved: list[Unresolved], prompts: list[str], at: float, cfg: ActiveLearningSettings) -> None:
    """The user-suite questions a newly promoted version fails: each worth a task at once (a failed check, not a whim)."""
    for prompt in prompts:
        _add(unresolved, Asked(prompt, "failed_case"), at, cfg)
        entry = next(e for e in unresolved if e.key == question_key(prompt))
        entry.asked = max(entry.asked, cfg.min_asks)


def note(unresolved: list[Unresolved], curated: Curated, at: float, cfg: ActiveLearningSettings) -> list[Closed]:
    """Apply one counted event to the user's unresolved questions; the tasks it answered."""
    closed: list[Closed] = []
    if curated.asked is None and not unresolved:
        return closed  # most events: nothing asked, nothing waiting
    if curated.answers_task is not None:
        for entry in [e for e in unresolved if e.task_id == curated.answers_task]:
            unresolved.remove(entry)
            closed.append(Closed(entry, "answered", at))
    if curated.resolved is not None:
        key = question_key(curated.resolved)
        for entry in [e for e in unresolved if e.key == key]:
            unresolved.remove(entry)
            if entry.task_id is not None:
                closed.append(Closed(entry, "answered", at))
    if curated.asked is not None:
        _add(unresolved, curated.asked, at, cfg)
    return closed


def _add(unresolved: list[Unresolved], asked: Asked, at: float, cfg: ActiveLearningSettings) -> None:
    judged = _kind_and_uncertainty(asked, cfg)
    if judged is None:
        return
    kind, uncertainty = judged
    key = question_key(asked.question)
    if not key:
        return
    for entry in unresolved:
        if entry.key == key:
            entry.asked += 1
            entry.last_at = max(entry.last_at, at)
            entry.uncertainty = max(entry.uncertainty, uncertainty)
            return
    unresolved.append(
        Unresolved(key=key, question=asked.question, kind=kind, intent=asked.intent, last_at=at, uncertainty=uncertainty)
    )
    if len(unresolved) > cfg.max_tracked:
        # The least worth goes, never one with an open task (its answer is awaited).
        candidates = [e for e in unresolved if e.task_id is None] or unresolved
        unresolved.remove(min(candidates, key=lambda e: worth(e, at, cfg)))


def _day(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).date().isoformat()


@dataclass
class Budget:
    """Tasks opened on one UTC day (event time) for one user."""

    day: str | None
    used: int

    def left(self, now: float, cfg: ActiveLearningSettings) -> int:
        if self.day != _day(now):
            self.day, self.used = _day(now), 0
        return max(0, cfg.daily_budget - self.used)


def expire(unresolved: list[Unresolved], now: float) -> list[Closed]:
    """Close the tasks past their expiry; their questions stay, to be asked again later."""
    closed = []
    for entry in unresolved:
        if entry.task_id is not None and entry.task_expires_at is not None and entry.task_expires_at <= now:
            closed.append(Closed(entry.model_copy(), "expired", now))
            entry.task_id = entry.task_created_at = entry.task_expires_at = None
    return closed


def open_tasks(
    user_id: str, unresolved: list[Unresolved], budget: Budget, now: float, cfg: ActiveLearningSettings
) -> list[Unresolved]:
    """Open tasks for the best questions without one, within the day's budget; the entries that got one."""
    room = budget.left(now, cfg)
    if room <= 0:
        return []
    ready = [e for e in unresolved if e.task_id is None and e.asked >= cfg.min_asks]
    ready.sort(key=lambda e: (-worth(e, now, cfg), e.key))
    chosen = ready[:room]
    for entry in chosen:
        entry.task_id = "rr-" + hashlib.sha256(f"{user_id}\0{entry.key}\0{now}".encode()).hexdigest()[:24]
        entry.task_created_at, entry.task_expires_at = now, now + cfg.task_ttl_h * 3600
    budget.used += len(chosen)
    return chosen


def as_message(user_id: str, entry: Unresolved, status: str, now: float, cfg: ActiveLearningSettings) -> ReviewRequest:
    """The task's record on `adapter.review-requests` (`status`: open, answered or expired)."""
    assert entry.task_id is not None and entry.task_created_at is not None and entry.task_expires_at is not None
    return ReviewRequest(
        review_request_id=entry.task_id,
        user_id=user_id,
        status=status,
        question=entry.question,
        kind=entry.kind,
        intent=entry.intent,
        asked=entry.asked,
        uncertainty=round(entry.uncertainty, 4),
        value=round(worth(entry, entry.task_created_at, cfg), 4),
        created_at=datetime.fromtimestamp(entry.task_created_at, UTC),
        expires_at=datetime.fromtimestamp(entry.task_expires_at, UTC),
        closed_at=None if status == "open" else datetime.fromtimestamp(now, UTC),
    )
