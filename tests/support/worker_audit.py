"""What a stream worker must have done with a stream of events, checked against the events themselves.

    result = audit_worker(w, events, states)    # states: the users' states read back once everything is counted
    assert (result.lost, result.duplicated) == (0, 0)

Counts: every user's event and gap counts equal the ground truth computed
from the events. Examples: each training example the events yield is in
exactly one place, the user's request dataset or the user's pending examples
(read back from the examples table's changelog). Requests: exactly those the
users' states opened, each once by `request_id`, their datasets intact.
The fault tests (tests/reliability) use it after killing or rebalancing
workers mid-stream.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from core.settings import changelog_topic
from tests.support.events import ground_truth
from tests.support.handles import WorkerHandle
from tests.support.kafka import read_topic

GAPS = ("missed_intent", "negative_rating", "correction", "concept_gap")


@dataclass(frozen=True)
class WorkerAudit:
    lost: int  # event or gap counts below the truth
    duplicated: int  # ... above it
    examples: int  # training examples the events yield
    examples_lost: int  # in neither the user's datasets nor its pending examples
    examples_doubled: int  # in both, or in either without an event yielding it
    requests: int  # distinct training requests on the topic
    deliveries: int  # records of them (a request resent after a crash keeps its request_id)
    request_errors: int  # requests a state did not open, opened ones missing, datasets not matching their hash

    def summary(self, users: int) -> str:
        """The result column of docs/RELIABILITY.md."""
        return (
            f"event and gap counts equal the ground truth for all {users} users; each of the {self.examples} training "
            f"examples in its user's dataset or pending, once; {self.requests} training requests, each opened once by "
            f"its user's state, datasets intact ({self.deliveries - self.requests} records sent again, same request_id)"
        )

    def figures(self) -> dict:
        """What the `figures` recorder takes besides the summary: lost and duplicated effects, and their parts."""
        return {
            "lost": self.lost + self.examples_lost,
            "duplicated": self.duplicated + self.examples_doubled,
            "requests": self.requests,
            "request_deliveries": self.deliveries,
            "request_errors": self.request_errors,
            "examples_lost": self.examples_lost,
            "examples_doubled": self.examples_doubled,
        }

    def check(self, users: int) -> None:
        """Nothing lost, nothing twice, every request accounted for, and most users crossed the threshold."""
        assert (self.lost, self.duplicated) == (0, 0), f"event or gap counts off: {self.lost} lost, {self.duplicated} twice"
        assert (self.examples_lost, self.examples_doubled) == (0, 0), (
            f"examples off: {self.examples_lost} lost, {self.examples_doubled} twice"
        )
        assert self.requests >= users // 2, f"only {self.requests} requests: most users should cross the threshold"
        assert self.request_errors == 0, f"{self.request_errors} requests not accounted for by their users' states"


def audit_worker(w: WorkerHandle, events: list[tuple[str, dict]], states: dict[str, dict]) -> WorkerAudit:
    truth = ground_truth(events)
    lost = duplicated = 0
    for user, counter in truth.items():
        got = states[user]
        lost += max(0, counter["events"] - got["events_total"])
        duplicated += max(0, got["events_total"] - counter["events"])
        for gap in GAPS:
            lost += max(0, counter[gap] - got["gap_totals"][gap])
            duplicated += max(0, got["gap_totals"][gap] - counter[gap])
    records = w.requests()
    live = {r["request_id"]: r for r in records}
    examples_truth, pending = _examples_truth(events), _pending_event_ids(w, states)
    assert any(pending.values()), "examples pending after the requests: both places are checked"
    examples_lost = examples_doubled = 0
    for user, expected in examples_truth.items():
        in_datasets = set().union(*(_dataset_event_ids(r) for r in live.values() if r["user_id"] == user))
        examples_lost += len(expected - in_datasets - pending[user])
        examples_doubled += len(in_datasets & pending[user]) + len((in_datasets | pending[user]) - expected)
        assert states[user]["pending_dropped"] == 0, "max_pending was reached: the accounting would not hold"
    return WorkerAudit(
        lost,
        duplicated,
        sum(len(v) for v in examples_truth.values()),
        examples_lost,
        examples_doubled,
        len(live),
        len(records),
        _request_errors(truth, states, live),
    )


def _request_errors(truth: dict, states: dict[str, dict], live: dict[str, dict]) -> int:
    """Requests a user's state does not account for, and requests whose dataset does not match its hash."""
    errors = 0
    for user in truth:
        ids = {rid for rid, r in live.items() if r["user_id"] == user}
        state = states[user]
        errors += abs(len(ids) - state.get("requests_total", 0))
        if state.get("open_request") and state["open_request"]["request_id"] not in ids:
            errors += 1
    for r in live.values():
        if hashlib.sha256(_file(r["dataset"]["uri"])).hexdigest() != r["dataset"]["sha256"]:
            errors += 1
    return errors


def _file(uri: str) -> bytes:
    return Path(uri.removeprefix("file://")).read_bytes()


def _examples_truth(events: list[tuple[str, dict]]) -> dict[str, set[str]]:
    """Per user: the event_ids (first delivery) whose event yields a training example, computed without the worker."""
    from core.settings import defaults
    from schemas.events import EVENT_TYPE_BY_INPUT_KIND
    from streams.curation import curate

    truth: dict[str, set[str]] = {}
    seen: set[str] = set()
    for kind, data in events:
        if data["event_id"] not in seen:
            seen.add(data["event_id"])
            if curate(EVENT_TYPE_BY_INPUT_KIND[kind].model_validate(data), None, defaults().streams.curation).examples:
                truth.setdefault(data["user_id"], set()).add(data["event_id"])
    return truth


def _pending_event_ids(w: WorkerHandle, states: dict[str, dict]) -> dict[str, set[str]]:
    """Per user: the event_ids of the examples still pending, from the examples table's changelog."""
    latest: dict[bytes, bytes | None] = {}
    for record in read_topic(w.client, changelog_topic(w.app_id, "examples")):
        latest[record.key] = record.value
    pending: dict[str, set[str]] = {}
    for user, state in states.items():
        prefix = user.encode() + b"\x00"
        rows = (latest.get(prefix + b"%016d" % seq) for seq in range(state["pending_first"], state["pending_next"]))
        pending[user] = {json.loads(row)["event_id"] for row in rows if row is not None}
    return pending


def _dataset_event_ids(request: dict) -> set[str]:
    ids = set()
    for uri in (request["dataset"]["uri"], request["dataset"].get("test_uri")):
        if uri:
            ids |= {json.loads(line)["event_id"] for line in _file(uri).decode().splitlines() if line.strip()}
    return ids
