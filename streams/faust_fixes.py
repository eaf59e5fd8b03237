"""A fix for faust-streaming's consumer (0.11-0.15): fetched records a rebalance cut off are re-read, not skipped.

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

    apply()   # once per process, before the Faust app starts (streams.app does it)
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("adaptloop.streams")


async def _reread_instead_of_skipping(self, tp, offset_from: int, offset_to: int) -> None:
    from streams import metrics

    metrics.REREADS.inc()
    log.warning("%s: offsets %d..%d were fetched but never delivered (a rebalance cut the fetch); re-reading from the committed offset",
                tp, offset_from, offset_to - 1)  # fmt: skip
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
    """Idempotent: it only rebinds one method."""
    from faust.transport.consumer import Consumer

    Consumer._add_gap = _reread_instead_of_skipping
