"""Fixes for faust-streaming's consumer (0.11-0.15): records a rebalance cut off are re-read, never skipped.

When the flow stops (a rebalance), `Consumer.getmany()` abandons the rest of
a fetch, though aiokafka's position has already moved past it. The next
record delivered then lies beyond a hole, which `_add_gap` records as a
"gap" (meant for offsets that hold no record, like transaction markers) and
counts as acknowledged, so the next commit moves past records nobody
processed: the chaos test (tests/reliability) lost 1-2 events in 3,000 this
way. Here a hole instead makes the consumer seek back to its committed
offsets and read on from there; what is read twice is dropped by the
worker's event-id dedupe. The input topics are written without
transactions, so a hole in them is never a real gap.

A second path loses records without a hole in the fetch: when a rebalance
suspends the flow while a record waits to enter a full stream buffer,
`_drain_messages` still marks it read (and may mark it read after the
rebalance's seek, so the re-read records below it are dropped as already
seen). Nothing acknowledges them, so the records after them are processed
but their commit stalls; Faust's `_new_offset` even commits past a single
missing record at the committed offset (its head-gap test is off by one).
`_new_offset` is replaced by one that never commits past an unacknowledged
record, and re-reads from the committed offset when such a hole stays open
for `HOLE_PATIENCE_S` (records of a partition are acknowledged in order, so
a later record acknowledged before an earlier one means the earlier one was
lost, not slow).

A third fix is for speed: the consumer's empty fetches wait 100 ms at the
broker, not 1.5 s (`_fetch_without_long_waits`).

    apply()   # once per process, before the Faust app starts (streams.app does it)
"""

from __future__ import annotations

import asyncio
import logging
import time

from faust.transport.consumer import Consumer

log = logging.getLogger("adaptloop.streams")

HOLE_PATIENCE_S = 5.0  # several commit intervals (1 s): a hole this old is a lost record
clock = time.monotonic  # how old a hole is (a test sets its own clock)
_faust_new_offset = Consumer._new_offset


async def _reread_instead_of_skipping(self, tp, offset_from: int, offset_to: int) -> None:
    log.warning(
        "%s: offsets %d..%d were fetched but never delivered (a rebalance cut the fetch); re-reading from the committed offset",
        tp,
        offset_from,
        offset_to - 1,
    )
    _reread_from_committed(self)


def _new_offset_never_past_a_hole(self, tp):
    """Faust's `_new_offset`, except that an unacknowledged record at the committed offset stops the commit."""
    acked, committed = self._acked[tp], self._committed_offset[tp]
    holes = self.__dict__.setdefault("_adaptloop_holes", {})
    if acked and committed is not None and min(acked) > committed:
        first_seen = holes.setdefault((tp, committed), clock())
        if clock() - first_seen >= HOLE_PATIENCE_S:
            del holes[(tp, committed)]
            log.warning(
                "%s: offsets %d..%d were never delivered though later ones were processed; re-reading from the committed offset",
                tp,
                committed,
                min(acked) - 1,
            )
            _reread_from_committed(self)
        return None
    for key in [k for k in holes if k[0] == tp]:
        del holes[key]
    return _faust_new_offset(self, tp)


def _reread_from_committed(self) -> None:
    """Stop the flow, seek every partition to its committed offset, read on (the worker's dedupe drops repeats)."""
    from streams import metrics

    metrics.REREADS.inc()
    if not self.flow_active or self.app.rebalancing:
        # A rebalance is under way: it seeks the stream partitions to their committed offsets itself when its
        # recovery is done. Its recovery resumes the flow to read the changelogs and will not resume it again,
        # so a flow stopped here then would never restart (a worker hung in recovery in a two-worker test).
        return
    generation = self.app.consumer_generation_id
    self.stop_flow()

    async def reread() -> None:
        try:
            await self.wait_for_stopped_flow()
            await self.perform_seek()
        finally:
            if self.app.consumer_generation_id == generation and not self.app.rebalancing:
                self.resume_flow()  # otherwise the rebalance resumes the flow when it is done

    asyncio.ensure_future(reread())


def apply() -> None:
    """Idempotent: it only rebinds three methods."""
    Consumer._add_gap = _reread_instead_of_skipping
    Consumer._new_offset = _new_offset_never_past_a_hole
    _fetch_without_long_waits()


FETCH_MAX_WAIT_MS = 100  # Faust's aiokafka consumer waits up to 1,500 ms


def _fetch_without_long_waits() -> None:
    """The worker's consumer asks the broker to hold an empty fetch for 100 ms, not Faust's fixed 1.5 s.

    aiokafka sends one fetch per broker at a time, for the partitions whose
    records are used up. While the worker handles a batch, that fetch goes
    out for the quiet topics (commands, lifecycle, the internal topic) alone
    and the broker holds it for the full wait, so the busy partitions, drained
    a moment later, wait behind it: the worker sat idle ~1 s between batches.
    """
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    create = AIOKafkaConsumerThread._create_worker_consumer
    if getattr(create, "adaptloop_fix", False):
        return

    def create_worker_consumer(self, transport):
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read when the consumer starts its fetcher
        return consumer

    create_worker_consumer.adaptloop_fix = True  # type: ignore[attr-defined]
    AIOKafkaConsumerThread._create_worker_consumer = create_worker_consumer
