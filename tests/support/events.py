"""Valid input events for tests, and the counts a worker must reach for them."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime

INPUT_KINDS = ("intent_traces", "feedback", "conversations", "concept_gaps")
OTHER_TOPICS = ("commands", "training_requests", "lifecycle", "dlq", "forgotten", "review_requests")
TOPIC_KEYS = (*INPUT_KINDS, *OTHER_TOPICS)


def event(topic_kind: str, user: str, n: int, t0: float = 1_780_000_000.0, **fields) -> tuple[str, dict]:
    """A valid input event; `n` makes the event_id and the timestamp (t0 + n seconds)."""
    base = {"event_id": f"{user}-{topic_kind}-{n}", "user_id": user, "timestamp": datetime.fromtimestamp(t0 + n, UTC).isoformat()}
    defaults = {
        "intent_traces": {"intent": "fact", "status": "missed", "query": f"Question {n}?", "resolution": f"Answer {n}."},
        "feedback": {
            "kind": "correction",
            "query": f"What is fact {n}?",
            "response": "Wrong.",
            "correction": f"Fact {n} is true.",
        },
        "conversations": {"session_id": "s1", "question": f"Chat {n}?", "answer": f"Reply {n}."},
        "concept_gaps": {"concept": f"Concept{n}", "description": f"Concept{n} is a thing."},
    }[topic_kind]
    return topic_kind, base | defaults | fields


def ground_truth(events: list[tuple[str, dict]]) -> dict[str, Counter]:
    """Per user: events (first delivery of each event_id) and gaps by kind, computed without the worker."""
    from core.settings import defaults
    from schemas.events import EVENT_TYPE_BY_INPUT_KIND
    from streams.curation import curate

    curation = defaults().streams.curation
    truth: dict[str, Counter] = {}
    seen = set()
    for kind, data in events:
        if data["event_id"] in seen:
            continue
        seen.add(data["event_id"])
        gap = curate(EVENT_TYPE_BY_INPUT_KIND[kind].model_validate(data), None, curation).gap
        counter = truth.setdefault(data["user_id"], Counter())
        counter["events"] += 1
        if gap:
            counter[gap] += 1
    return truth


def mixed_events(rng: random.Random, count: int, users: int) -> list[tuple[str, dict]]:
    """`count` valid events of all four input kinds for `users` users (user00, user01, ...); half the feedback
    is negative ratings, half corrections."""
    kinds = list(INPUT_KINDS)
    names = [f"user{i:02d}" for i in range(users)]
    out = []
    for n in range(count):
        kind = rng.choice(kinds)
        extra = {"kind": "rating", "rating": -1, "correction": None} if kind == "feedback" and n % 2 else {}
        out.append(event(kind, rng.choice(names), n, **extra))
    return out
