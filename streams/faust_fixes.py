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
    if not self.flow_active:
        return  # a rebalance is under way: it seeks to the committed offsets itself
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
    """Idempotent: it only rebinds two methods."""
    Consumer._add_gap = _reread_instead_of_skipping
    Consumer._new_offset = _new_offset_never_past_a_hole
