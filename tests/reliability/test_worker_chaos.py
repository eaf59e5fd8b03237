"""The stream worker SIGKILLed at random points, 10 times, during 20,000 events for 50 users.

Afterwards every user's event and gap counts equal the ground truth computed
from the events; every training example the events yield is in exactly one
place, the user's request dataset or the user's pending examples (read back
from the examples table's changelog); and the training requests on the topic
are exactly those the users' states opened, each once: nothing lost, nothing
counted twice.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from tests.support.events import mixed_events
from tests.support.worker_audit import audit_worker

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

EVENTS, USERS, KILLS = 20_000, 50, 10


def test_worker_sigkilled_ten_times_loses_nothing_and_counts_nothing_twice(worker_factory, figures, tmp_path):
    # The broker's minimum session timeout: a killed worker's partitions move in ~6 s.
    w = worker_factory(min_gap_events=60, streams={"batch_size": 200}, kafka={"session_timeout_s": 6})
    rng = random.Random(2026)
    events = mixed_events(rng, EVENTS, USERS)
    chunks = [events[i : i + 500] for i in range(0, len(events), 500)]
    started = time.monotonic()

    def publish_steadily() -> None:  # the stream keeps flowing while the worker dies (the pace is the workload, not a wait)
        for chunk in chunks:
            w.publish(chunk)
            time.sleep(0.5)

    publisher = threading.Thread(target=publish_steadily, daemon=True)
    publisher.start()
    kill_points = []
    for _ in range(KILLS):
        # Kill a worker at work: it has its partitions and counted events since it (re)started, or has
        # counted them all; then at a random point of that work (the fault under test: a random instant).
        before = w.counted()
        w.wait_for(
            lambda before=before: w.counted() > before or w.counted() >= EVENTS, timeout=180, what="the restarted worker at work"
        )
        time.sleep(rng.uniform(0.0, 2.0))  # a random instant of that work: the fault model
        kill_points.append(round(time.monotonic() - started, 1))
        w.kill()
        w.start()
    publisher.join(300)
    assert not publisher.is_alive()
    killed_s = time.monotonic() - started
    states = w.wait_for(lambda: w.states_once_counted(EVENTS), timeout=300, what="all events counted")
    settle_s = time.monotonic() - started
    result = audit_worker(w, events, states)
    figures(
        "Faults",
        "Stream worker SIGKILLed at random points and restarted",
        f"{KILLS} SIGKILLs during {EVENTS:,} events for {USERS} users",
        result=result.summary(USERS),
        kill_points_s=kill_points,
        kills_done_s=round(killed_s, 1),
        settle_s=round(settle_s, 1),
        **result.figures(),
    )
    result.check(USERS)
