"""The worker's batch drain (streams/fetch.py) on a stand-in with the consumer's bookkeeping (no broker needed)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace

import pytest
from faust.types import TP

from streams import fetch

pytestmark = pytest.mark.unit

SOURCE, CHANGELOG = "events", "app-users-changelog"


class Message:
    """A consumed record as Faust gives it (hashed by identity, as Faust's are)."""

    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self.topic, self.partition, self.offset, self.tp = topic, partition, offset, TP(topic, partition)
        self.key, self.value = b"k", b"v"


message = Message


class ConsumerStandIn:
    """What the drain uses of Faust's consumer: fetches to hand out, offsets read, acks, gaps, the conductor."""

    def __init__(self, fetches: list[list], generation: int = 1) -> None:
        self.fetches = list(fetches)
        self.app = SimpleNamespace(consumer_generation_id=generation, topics=SimpleNamespace(acks_enabled_for=lambda t: True))
        self._read_offset: defaultdict = defaultdict(lambda: None)
        self._unacked_messages: set = set()
        self._commit_every = None
        self._n_acked = 0
        self.acked: list = []
        self.gaps: list = []
        self.conductor: list = []
        self.should_stop = False

    async def getmany(self, timeout: float):
        for m in self.fetches.pop(0) if self.fetches else []:
            yield m.tp, m

    def ack(self, m) -> None:
        self.acked.append((m.topic, m.partition, m.offset))
        self._unacked_messages.discard(m)

    async def _add_gap(self, tp, start: int, end: int) -> None:
        self.gaps.append((tp.partition, start, end))

    async def callback(self, m) -> None:
        self.conductor.append((m.topic, m.offset))


async def sent_at_once() -> None:
    """A batch's outputs, acknowledged as soon as asked about."""


async def deliver(consumer: ConsumerStandIn, fetched: list, generation: int, handle, batch_size: int) -> None:
    """`fetched` through the drain, then the last batch's sends waited for (as the drain does when a fetch is empty)."""
    batches = fetch.Batches(handle, batch_size)
    try:
        await fetch.deliver(consumer, fetched, generation, frozenset({SOURCE}), batches)
    finally:
        await batches.settle()


def drain_once(consumer: ConsumerStandIn, handle, batch_size: int = 3, within_s: float = 0.0) -> None:
    async def run() -> None:
        generation = consumer.app.consumer_generation_id
        fetched = await fetch.fill(consumer, batch_size, within_s)
        await deliver(consumer, fetched, generation, handle, batch_size)

    asyncio.run(run())


def test_a_fetch_goes_to_the_handler_in_batches_and_is_acked_only_after_each_batch():
    consumer = ConsumerStandIn([[message(SOURCE, 0, n) for n in range(7)]])
    batches = []

    async def handle(batch):
        assert all(m in consumer._unacked_messages for m in batch), "a batch is pending until handled"
        assert not {(m.topic, m.partition, m.offset) for m in batch} & set(consumer.acked), "acked before its handler returned"
        batches.append([m.offset for m in batch])
        return sent_at_once()

    drain_once(consumer, handle)
    assert batches == [[0, 1, 2], [3, 4, 5], [6]]
    assert consumer.acked == [(SOURCE, 0, n) for n in range(7)] and not consumer._unacked_messages
    assert consumer._read_offset[TP(SOURCE, 0)] == 6 and consumer.gaps == [], "consecutive offsets are no hole"


def test_a_failing_batch_leaves_its_messages_unacknowledged():
    consumer = ConsumerStandIn([[message(SOURCE, 0, n) for n in range(2)]])

    async def handle(batch):
        raise RuntimeError("the broker went away")

    with pytest.raises(RuntimeError):
        drain_once(consumer, handle)
    assert consumer.acked == [] and consumer._read_offset[TP(SOURCE, 0)] is None, "read again after the restart"


def test_the_next_batch_is_worked_out_while_the_one_before_waits_for_its_acknowledgements():
    consumer = ConsumerStandIn([[message(SOURCE, 0, n) for n in range(4)]])
    acknowledged = {0: asyncio.Event(), 1: asyncio.Event()}
    events = []

    async def handle(batch):
        first = batch[0].offset // 2
        events.append(("worked", first, sorted(offset for _t, _p, offset in consumer.acked)))
        if first == 1:
            acknowledged[0].set()  # the broker answers the first batch only now, after the second was worked out

        async def sent() -> None:
            await acknowledged[first].wait()

        return sent()

    async def run() -> None:
        fetched = await fetch.fill(consumer, 2, 0.0)
        batches = fetch.Batches(handle, 2)
        await fetch.deliver(consumer, fetched, 1, frozenset({SOURCE}), batches)
        assert [offset for _t, _p, offset in consumer.acked] == [0, 1], "acked once its sends were, not before"
        assert len(consumer._unacked_messages) == 2, "the second batch waits for its own acknowledgements"
        acknowledged[1].set()
        await batches.settle()

    asyncio.run(run())
    assert events == [("worked", 0, []), ("worked", 1, [])], "the second batch did not wait for the first's acks"
    assert consumer.acked == [(SOURCE, 0, n) for n in range(4)] and not consumer._unacked_messages


def test_a_batch_whose_sends_fail_stays_unacknowledged_and_the_drain_raises():
    consumer = ConsumerStandIn([[message(SOURCE, 0, n) for n in range(4)]])

    async def handle(batch):
        async def sent() -> None:
            if batch[0].offset == 0:
                raise RuntimeError("the broker refused the batch's writes")

        return asyncio.ensure_future(sent())  # under way, as the worker's sends are

    with pytest.raises(RuntimeError, match="refused"):
        drain_once(consumer, handle, batch_size=2)
    assert consumer.acked == [], "neither the failed batch nor the one after it"


def test_a_fetch_overtaken_by_a_rebalance_is_dropped_unacknowledged():
    consumer = ConsumerStandIn([[message(SOURCE, 0, 0), message(SOURCE, 0, 1)]])
    handled = []

    async def handle(batch):
        handled.extend(batch)
        return sent_at_once()

    async def run() -> None:
        fetched = await fetch.fill(consumer, 10, 0.0)
        consumer.app.consumer_generation_id = 2  # the partitions moved while the fetch waited
        await deliver(consumer, fetched, 1, handle, 10)

    asyncio.run(run())
    assert handled == [] and consumer.acked == [], "their new owner reads them from the committed offset"


def test_a_fetch_overtaken_by_a_rebalance_loses_its_worker_records_before_its_holes_are_looked_for():
    # A partition that moved away and came back: its read offset is from its earlier stay, so the fetch of the
    # generation before looks like a hole. Reporting it would make faust_fixes re-read in the middle of the
    # rebalance's recovery (a worker hung there in the two-worker test).
    consumer = ConsumerStandIn([[message(SOURCE, 0, 40), message(CHANGELOG, 0, 7)]])
    consumer._read_offset[TP(SOURCE, 0)] = 12

    async def handle(batch):
        raise AssertionError("nothing of the overtaken fetch is handled")

    async def run() -> None:
        fetched = await fetch.fill(consumer, 10, 0.0)
        consumer.app.consumer_generation_id = 2
        await deliver(consumer, fetched, 1, handle, 10)

    asyncio.run(run())
    assert consumer.gaps == [] and consumer.acked == []
    assert consumer._read_offset[TP(SOURCE, 0)] == 12, "the rebalance's seek sets it"
    assert consumer.conductor == [(CHANGELOG, 7)], "the recovery's records go on: nothing would fetch them again"


def test_a_hole_and_a_repeat_are_handled_as_faust_does():
    consumer = ConsumerStandIn([[message(SOURCE, 0, 5)], [message(SOURCE, 0, 4), message(SOURCE, 0, 6), message(SOURCE, 0, 9)]])
    consumer._read_offset[TP(SOURCE, 0)] = 4
    handled = []

    async def handle(batch):
        handled.extend(m.offset for m in batch)
        return sent_at_once()

    drain_once(consumer, handle, batch_size=10)
    drain_once(consumer, handle, batch_size=10)
    assert handled == [5, 6, 9], "offset 4 was read before; dropped as Faust drops it"
    assert consumer.gaps == [(0, 7, 9)], "7..8 never came: a hole (faust_fixes re-reads it)"


def test_changelog_records_take_faust_path_in_order():
    fetched = [message(SOURCE, 0, 0), message(CHANGELOG, 0, 0), message(SOURCE, 0, 1)]
    consumer = ConsumerStandIn([fetched])
    order = []

    async def handle(batch):
        order.append(("batch", [m.offset for m in batch]))
        return sent_at_once()

    async def run() -> None:
        got = await fetch.fill(consumer, 10, 0.0)
        await deliver(consumer, got, 1, handle, 10)

    asyncio.run(run())
    assert order == [("batch", [0]), ("batch", [1])] and consumer.conductor == [(CHANGELOG, 0)]
    assert (CHANGELOG, 0, 0) not in consumer.acked, "a table's records are not the worker's to ack"


def test_a_batch_fills_from_several_fetches_until_its_size():
    consumer = ConsumerStandIn(
        [[message(SOURCE, 0, 0)], [message(SOURCE, 0, 1)], [message(SOURCE, 0, 2)], [message(SOURCE, 0, 3)]]
    )

    async def run() -> list:
        return await fetch.fill(consumer, 3, 60.0)

    assert [m.offset for m in asyncio.run(run())] == [0, 1, 2], "stops at the batch size, not at the deadline"
