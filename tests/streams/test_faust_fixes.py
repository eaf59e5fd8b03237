"""The consumer fixes in streams/faust_fixes.py, on a stand-in with the consumer's bookkeeping (no broker needed)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace

import pytest
from faust.types import TP
from intervaltree import IntervalTree

from streams import faust_fixes, metrics

pytestmark = pytest.mark.unit

TOPIC = TP("events", 0)


class ConsumerBookkeeping:
    """The attributes `Consumer._new_offset` and the re-read use, with the flow calls recorded."""

    def __init__(self, committed: int, acked: list[int]) -> None:
        self._committed_offset = {TOPIC: committed}
        self._acked = defaultdict(list, {TOPIC: list(acked)})
        self._acked_index = defaultdict(set, {TOPIC: set(acked)})
        self._gap = defaultdict(IntervalTree)
        self.flow_active = True
        self.app = SimpleNamespace(consumer_generation_id=1, rebalancing=False)
        self.calls: list[str] = []

    def stop_flow(self) -> None:
        self.flow_active = False
        self.calls.append("stop_flow")

    async def wait_for_stopped_flow(self) -> None:
        self.calls.append("wait_for_stopped_flow")

    async def perform_seek(self) -> None:
        self.calls.append("perform_seek")

    def resume_flow(self) -> None:
        self.flow_active = True
        self.calls.append("resume_flow")


def test_contiguous_acks_commit_as_faust_does():
    consumer = ConsumerBookkeeping(committed=5, acked=[5, 6, 7, 9])
    assert faust_fixes._new_offset_never_past_a_hole(consumer, TOPIC) == 8
    assert consumer._acked[TOPIC] == [9] and not consumer.calls


def test_a_missing_record_at_the_committed_offset_is_never_committed_past():
    # Faust's own test of a head gap is off by one: offset 5 was never acknowledged, yet it commits 8.
    assert faust_fixes._faust_new_offset(ConsumerBookkeeping(committed=5, acked=[6, 7]), TOPIC) == 8
    consumer = ConsumerBookkeeping(committed=5, acked=[6, 7])
    assert faust_fixes._new_offset_never_past_a_hole(consumer, TOPIC) is None
    assert consumer._acked[TOPIC] == [6, 7] and not consumer.calls, "a young hole may still fill: no re-read yet"


def test_a_hole_that_stays_open_makes_the_consumer_reread_from_the_committed_offset(monkeypatch):
    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(faust_fixes, "clock", lambda: clock.now)  # the patience is counted on this clock
    consumer = ConsumerBookkeeping(committed=5, acked=[7, 8])
    rereads = metrics.REREADS._value.get()

    async def commits() -> None:
        assert faust_fixes._new_offset_never_past_a_hole(consumer, TOPIC) is None
        clock.now += faust_fixes.HOLE_PATIENCE_S / 3
        assert faust_fixes._new_offset_never_past_a_hole(consumer, TOPIC) is None
        assert not consumer.calls, "a young hole may still fill"
        clock.now += faust_fixes.HOLE_PATIENCE_S
        assert faust_fixes._new_offset_never_past_a_hole(consumer, TOPIC) is None
        for _ in range(100):  # the re-read runs as a task: let it run to its end
            if len(consumer.calls) == 4:
                break
            await asyncio.sleep(0)

    asyncio.run(commits())
    assert consumer.calls == ["stop_flow", "wait_for_stopped_flow", "perform_seek", "resume_flow"]
    assert metrics.REREADS._value.get() == rereads + 1
    # The re-read delivers 5 and 6 again; then the commit goes on as usual.
    consumer._acked[TOPIC][:0] = [5, 6]
    assert faust_fixes._new_offset_never_past_a_hole(consumer, TOPIC) == 9


def test_a_hole_found_during_a_rebalance_leaves_the_seek_to_the_rebalance():
    consumer = ConsumerBookkeeping(committed=5, acked=[7])
    consumer.flow_active = False
    asyncio.run(faust_fixes._reread_instead_of_skipping(consumer, TOPIC, 5, 7))
    assert consumer.calls == []


def test_a_hole_found_while_a_rebalance_recovers_the_tables_leaves_the_flow_running():
    # The recovery resumed the flow to read the changelogs, and resumes it only once: stopping it now would hang
    # the recovery for good. The rebalance seeks to the committed offsets itself when it is done.
    consumer = ConsumerBookkeeping(committed=5, acked=[7])
    consumer.app.rebalancing = True

    async def hole() -> None:
        await faust_fixes._reread_instead_of_skipping(consumer, TOPIC, 5, 7)
        for _ in range(10):  # a re-read would run as a task: give it the chance
            await asyncio.sleep(0)

    asyncio.run(hole())
    assert consumer.calls == [] and consumer.flow_active


def test_the_worker_consumer_waits_briefly_for_empty_fetches(monkeypatch):
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    monkeypatch.setattr(
        AIOKafkaConsumerThread, "_create_worker_consumer", lambda self, transport: SimpleNamespace(_fetch_max_wait_ms=1500)
    )
    faust_fixes._fetch_without_long_waits()
    faust_fixes._fetch_without_long_waits()  # idempotent: wrapped once
    consumer = AIOKafkaConsumerThread._create_worker_consumer(object(), None)
    assert consumer._fetch_max_wait_ms == faust_fixes.FETCH_MAX_WAIT_MS == 100
