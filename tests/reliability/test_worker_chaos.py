"""The stream worker SIGKILLed at random points, 10 times, during 20,000 events for 50 users.

Afterwards every user's event and gap counts equal the ground truth computed
from the events; every training example the events yield is in exactly one
place, the user's request dataset or the user's pending examples (read back
from the examples table's changelog); and the training requests on the topic
are exactly those the users' states opened, each once: nothing lost, nothing
counted twice.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from pathlib import Path

import pytest

from core.settings import changelog_topic
from tests.support.events import event, ground_truth
from tests.support.kafka import read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

EVENTS, USERS, KILLS = 20_000, 50, 10
GAPS = ("missed_intent", "negative_rating", "correction", "concept_gap")


def _events(rng: random.Random) -> list[tuple[str, dict]]:
    kinds = ["intent_traces", "feedback", "conversations", "concept_gaps"]
    users = [f"user{i:02d}" for i in range(USERS)]
    out = []
    for n in range(EVENTS):
        kind = rng.choice(kinds)
        extra = {"kind": "rating", "rating": -1, "correction": None} if kind == "feedback" and n % 2 else {}
        out.append(event(kind, rng.choice(users), n, **extra))
    return out


def _unique_requests(w) -> tuple[dict[str, dict], int]:
    """The training requests on the topic by request_id, and how many deliveries there were in all."""
    records = w.requests()
    return {r["request_id"]: r for r in records}, len(records)


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


def _pending_event_ids(w, states: dict[str, dict]) -> dict[str, set[str]]:
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


def test_worker_sigkilled_ten_times_loses_nothing_and_counts_nothing_twice(worker_factory, figures, tmp_path):
    # The broker's minimum session timeout: a killed worker's partitions move in ~6 s.
    w = worker_factory(min_gap_events=60, streams={"batch_size": 200}, kafka={"session_timeout_s": 6})
    rng = random.Random(2026)
    events = _events(rng)
    chunks = [events[i : i + 500] for i in range(0, len(events), 500)]
    started = time.monotonic()

    def publish_steadily() -> None:  # the stream keeps flowing while the worker dies (the pace is the workload, not a wait)
        for chunk in chunks:
            w.publish(chunk)
            time.sleep(0.5)

    def counted() -> int:
        return sum(s.get("events_total", 0) for s in w.states().values())

    publisher = threading.Thread(target=publish_steadily, daemon=True)
    publisher.start()
    kill_points = []
    for _ in range(KILLS):
        # Kill a worker at work: it has its partitions and counted events since it (re)started, or has
        # counted them all; then at a random point of that work (the fault under test: a random instant).
        before = counted()
        w.wait_for(
            lambda before=before: counted() > before or counted() >= EVENTS, timeout=180, what="the restarted worker at work"
        )
        time.sleep(rng.uniform(0.0, 2.0))  # a random instant of that work: the fault model
        kill_points.append(round(time.monotonic() - started, 1))
        w.kill()
        w.start()
    publisher.join(300)
    assert not publisher.is_alive()
    truth = ground_truth(events)

    def settled():
        states = w.states()
        return states if sum(s.get("events_total", 0) for s in states.values()) >= EVENTS else None

    killed_s = time.monotonic() - started
    states = w.wait_for(settled, timeout=300, what="all events counted")
    settle_s = time.monotonic() - started
    lost = duplicated = 0
    for user, counter in truth.items():
        got = states[user]
        lost += max(0, counter["events"] - got["events_total"])
        duplicated += max(0, got["events_total"] - counter["events"])
        for gap in GAPS:
            lost += max(0, counter[gap] - got["gap_totals"][gap])
            duplicated += max(0, got["gap_totals"][gap] - counter[gap])

    # Requests: exactly the ones each user's state opened, each once (by
    # request_id), its dataset intact; none the state does not know of.
    live, deliveries = _unique_requests(w)
    request_errors = 0
    for user in truth:
        ids = {rid for rid, r in live.items() if r["user_id"] == user}
        state = states[user]
        request_errors += abs(len(ids) - state.get("requests_total", 0))
        if state.get("open_request") and state["open_request"]["request_id"] not in ids:
            request_errors += 1
    for r in live.values():
        if hashlib.sha256(_file(r["dataset"]["uri"])).hexdigest() != r["dataset"]["sha256"]:
            request_errors += 1
    # Examples: each one the events yield is in the user's dataset or still pending, never both, never missing.
    examples_truth, pending = _examples_truth(events), _pending_event_ids(w, states)
    examples_lost = examples_doubled = 0
    assert any(pending.values()), "examples pending after the requests: both places are checked"
    for user, expected in examples_truth.items():
        in_datasets = set().union(*(_dataset_event_ids(r) for r in live.values() if r["user_id"] == user))
        examples_lost += len(expected - in_datasets - pending[user])
        examples_doubled += len(in_datasets & pending[user]) + len((in_datasets | pending[user]) - expected)
        assert states[user]["pending_dropped"] == 0, "max_pending was reached: the accounting below would not hold"
    figures(
        "Faults",
        "Stream worker SIGKILLed at random points and restarted",
        f"{KILLS} SIGKILLs during {EVENTS:,} events for {USERS} users",
        lost=lost + examples_lost,
        duplicated=duplicated + examples_doubled,
        result=f"event and gap counts equal the ground truth for all {USERS} users; each of the "
        f"{sum(len(v) for v in examples_truth.values())} training examples in its user's dataset or pending, once; "
        f"{len(live)} training requests, each "
        f"opened once by its user's state, datasets intact ({deliveries - len(live)} records sent again after a crash, "
        f"same request_id)",
        kill_points_s=kill_points,
        kills_done_s=round(killed_s, 1),
        settle_s=round(settle_s, 1),
        requests=len(live),
        request_deliveries=deliveries,
        request_errors=request_errors,
        examples_lost=examples_lost,
        examples_doubled=examples_doubled,
    )
    assert (lost, duplicated) == (0, 0)
    assert (examples_lost, examples_doubled) == (0, 0)
    assert len(live) >= USERS // 2, "most users crossed the threshold"
    assert request_errors == 0
