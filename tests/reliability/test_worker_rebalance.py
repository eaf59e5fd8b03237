"""Two stream workers of one app, joining and leaving gracefully while 24,000 events for 50 users flow.

Every change of membership is a rebalance that cuts through batches in
flight: partitions move from a leaving worker to the one that stays and from
a running worker to one that joins, and their tables are rebuilt from the
changelogs by the new owner. Afterwards the same accounting as after the
SIGKILLs of test_worker_chaos.py (tests/support/worker_audit.py): every
user's counts equal the ground truth, every training example is in one
place once, every request was opened once by its user's state.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from tests.support.events import mixed_events
from tests.support.kafka import partitions_per_member
from tests.support.processes import stop_processes
from tests.support.worker_audit import audit_worker

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

EVENTS, USERS, PARTITIONS = 24_000, 50, 3


def test_workers_joining_and_leaving_mid_stream_lose_nothing_and_count_nothing_twice(worker_factory, figures, tmp_path):
    a = worker_factory(min_gap_events=60, streams={"batch_size": 200}, kafka={"session_timeout_s": 6})
    b = a.peer(tmp_path / "worker-b.log", tmp_path / "cache-b")
    events = mixed_events(random.Random(2027), EVENTS, USERS)
    chunks = [events[i : i + 300] for i in range(0, len(events), 300)]
    started = time.monotonic()
    changes: list[tuple[float, list[int]]] = []  # when each split was reached

    def publish_steadily() -> None:  # the stream keeps flowing through the rebalances (the pace is the workload)
        for chunk in chunks:
            a.publish(chunk)
            time.sleep(0.5)

    def members_hold(split: list[int]):
        """The group's members hold `split` partitions of an input topic (sorted), and counting goes on."""
        before = a.counted()
        a.wait_for(
            lambda: partitions_per_member(a.client, a.app_id, a.topics["feedback"]) == split,
            timeout=120,
            what=f"the group split as {split}",
        )
        a.wait_for(lambda: a.counted() > before or a.counted() >= EVENTS, timeout=120, what="counting after the rebalance")
        changes.append((round(time.monotonic() - started, 1), split))

    publisher = threading.Thread(target=publish_steadily, daemon=True)
    publisher.start()
    try:
        members_hold([PARTITIONS])
        b.start()  # joins: a's partitions are cut in two
        members_hold([1, PARTITIONS - 1])
        stop_processes([a.service.proc])  # a leaves gracefully (SIGTERM): b takes everything
        members_hold([PARTITIONS])
        a.start()  # a joins again
        members_hold([1, PARTITIONS - 1])
        stop_processes([b.service.proc])  # b leaves
        members_hold([PARTITIONS])
        b.start()
        members_hold([1, PARTITIONS - 1])
        publisher.join(300)
        assert not publisher.is_alive()
        states = a.wait_for(lambda: a.states_once_counted(EVENTS), timeout=300, what="all events counted")
    finally:
        b.stop()
    settle_s = time.monotonic() - started
    result = audit_worker(a, events, states)
    figures(
        "Faults",
        "Two stream workers joining and leaving one group mid-stream",
        f"{len(changes) - 1} rebalances (3 joins, 2 graceful leaves) during {EVENTS:,} events for {USERS} users",
        result=result.summary(USERS),
        changes_s=[at for at, _ in changes],
        settle_s=round(settle_s, 1),
        **result.figures(),
    )
    result.check(USERS)
