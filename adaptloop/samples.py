"""Deterministic sample interaction events: for the demo, tests and benchmarks.

`sample_events(users=..., per_user=..., seed=...)` gives a reproducible mix of
every input event type as `(input_kind, event_dict)` pairs;
`malformed_messages()` gives raw byte strings that must reach the DLQ.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

_FACTS = [
    ("What is my dog's name?", "Your dog is called Biscuit."),
    ("Where was I born?", "You were born in Tromsø."),
    ("What is my favourite programming language?", "Your favourite language is OCaml."),
    ("Which team do I support?", "You support Hibernian FC."),
    ("When is my sister's birthday?", "Your sister's birthday is on 14 March."),
    ("What is my employee number?", "Your employee number is 48213."),
]
_CONCEPTS = [
    ("Kafka consumer group", ["partition", "offset"], "A set of consumers that share the partitions of the topics they read."),
    ("LoRA", ["fine-tuning"], "Low-rank adaptation: training small matrices added to a frozen model's weights."),
    ("KRaft", ["ZooKeeper"], "Kafka's built-in Raft consensus that replaces ZooKeeper for metadata."),
]


def sample_events(users: list[str], per_user: int = 12, seed: int = 7, start: datetime | None = None) -> list[tuple[str, dict]]:
    """A reproducible stream of events of every input type for `users`."""
    rng = random.Random(seed)
    t0 = start or datetime(2026, 1, 1, tzinfo=UTC)
    out: list[tuple[str, dict]] = []
    for user in users:
        for i in range(per_user):
            ts = (t0 + timedelta(seconds=len(out))).isoformat()
            base = {"event_id": f"{user}-{seed}-{i}", "user_id": user, "timestamp": ts}
            question, answer = _FACTS[i % len(_FACTS)]
            choice = i % 6
            if choice == 0:
                out.append(
                    (
                        "intent_traces",
                        base
                        | {
                            "intent": "personal_fact",
                            "status": "missed",
                            "query": question,
                            "response": "I don't know.",
                            "resolution": answer,
                            "confidence": round(rng.uniform(0.5, 1.0), 2),
                        },
                    )
                )
            elif choice == 1:
                out.append(
                    (
                        "feedback",
                        base | {"kind": "correction", "query": question, "response": "I'm not sure.", "correction": answer},
                    )
                )
            elif choice == 2:
                out.append(
                    (
                        "conversations",
                        base
                        | {
                            "session_id": f"s-{user}-{i // 6}",
                            "question": question,
                            "answer": answer,
                            "rating": 5,
                            "rating_scale": "stars",
                        },
                    )
                )
            elif choice == 3:
                out.append(("feedback", base | {"kind": "rating", "query": question, "response": "No idea.", "rating": -1}))
            elif choice == 4:
                concept, related, description = _CONCEPTS[rng.randrange(len(_CONCEPTS))]
                out.append(("concept_gaps", base | {"concept": concept, "related": related, "description": description}))
            else:
                out.append(
                    (
                        "intent_traces",
                        base | {"intent": "small_talk", "status": "satisfied", "query": "Hello!", "response": "Hi there."},
                    )
                )
    return out


def malformed_messages() -> list[tuple[bytes, str]]:
    """Raw values that must be dead-lettered, each with a word on what is wrong."""
    good = {
        "event_id": "bad-1",
        "user_id": "mallory",
        "timestamp": "2026-01-01T00:00:00Z",
        "intent": "x",
        "status": "missed",
        "query": "q",
    }
    return [
        (b"\xff\xfe not utf-8", "not UTF-8"),
        (b"{not json", "not JSON"),
        (b"[1, 2, 3]", "not a JSON object"),
        (json.dumps(good | {"user_id": "../../etc/passwd"}).encode(), "hostile user_id"),
        (json.dumps(good | {"status": "exploded"}).encode(), "bad enum value"),
        (json.dumps({k: v for k, v in good.items() if k != "query"}).encode(), "missing field"),
        (json.dumps(good | {"confidence": "very"}).encode(), "wrong type"),
    ]
