"""The worker's source messages a fetch at a time, past Faust's per-event path.

Faust hands every message to its agent through the conductor (a lock per
message), a task per message (`wait_first`), a channel queue, an `Event`, the
stream's iterator and its acks, with sensors at each step: a bare Faust agent
tops out at about 12,000 events/s on a 2-core machine before any work is
done. The worker needs none of that: it works on a batch at once
(streams/batch.py). So the app's consumer gets a drain loop that gives each
fetch's messages of the worker's source topics to the batch handler in one
call:

    install(app, topics, handle)   # before the app starts; handle(messages) is async

Each turn of the drain: `fill` gathers what the fetches bring for a batch,
`deliver` gives the worker's messages to `Batches` (the handler and the
batch whose outputs are still being sent) and the rest to Faust.

What stays Faust's: the consumer, its group membership and rebalances, the
tables and their recovery (changelog messages still take Faust's path: they
go to the conductor one by one, as before), offset commits and the hole
fixes of streams/faust_fixes.py. What stays the worker's guarantee: a
message is acknowledged (its offset may be committed) only after its batch's
outputs were acknowledged by Kafka (the next batch is worked out meanwhile);
a fetch that a rebalance overtook is dropped unacknowledged, so the
partition's new owner reads it again from the committed offset.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from types import MethodType
from typing import Any

# The messages of one batch, in fetch order -> once worked out, an awaitable done when their outputs are acknowledged.
Handle = Callable[[list[Any]], Awaitable[Awaitable[None]]]


def install(app: Any, topics: Collection[str], handle: Handle, batch_size: int, within_s: float) -> None:
    """Give `app`'s consumer (made when the app starts) the batch drain for `topics`.

    A batch holds what the fetches brought within `within_s` of its first
    message, at most `batch_size` messages (a larger fetch is handled in
    several batches, the event loop running between them).
    """
    make_consumer = app._new_consumer
    drain = _drainer(frozenset(topics), handle, batch_size, within_s)

    def new_consumer() -> Any:
        consumer = make_consumer()
        consumer._drain_messages = MethodType(drain, consumer)
        return consumer

    app._new_consumer = new_consumer


def _drainer(topics: frozenset[str], handle: Handle, batch_size: int, within_s: float) -> Callable[..., Awaitable[None]]:
    async def drain_in_batches(consumer: Any, fetcher: Any) -> None:
        """Faust's `Consumer._drain_messages`, many messages at a time (same stop, error and offset handling)."""
        fetcher_should_stop = fetcher._stopped.is_set
        try:
            batches = Batches(handle, batch_size)
            while not (consumer._stopped.is_set() or fetcher_should_stop()):
                generation = consumer.app.consumer_generation_id
                fetched = await fill(consumer, batch_size, within_s)
                if fetched and not consumer.should_stop:
                    await deliver(consumer, fetched, generation, topics, batches)
                elif not fetched:
                    await batches.settle()  # quiet: a failure of the last sends surfaces here
        except consumer.consumer_stopped_errors:
            if not consumer.transport.app.should_stop:
                raise
        except asyncio.CancelledError:
            if not consumer.transport.app.should_stop:
                raise

    return drain_in_batches


async def fill(consumer: Any, batch_size: int, within_s: float) -> list[Any]:
    """Fetches until `batch_size` messages, `within_s` after the first, or a rebalance; all they brought."""
    loop = asyncio.get_running_loop()
    generation = consumer.app.consumer_generation_id
    fetched: list[Any] = [message async for _tp, message in consumer.getmany(timeout=1.0)]
    deadline = loop.time() + within_s
    while fetched and len(fetched) < batch_size and consumer.app.consumer_generation_id == generation:
        left = deadline - loop.time()
        if left <= 0 or consumer.should_stop:
            break
        fetched += [message async for _tp, message in consumer.getmany(timeout=left)]
    await asyncio.sleep(0)  # as Faust's: getmany may not yield to the loop
    return fetched


class Batches:
    """The handler, the most messages it gets at once, and the batch whose outputs are still being sent.

    A batch is worked out while the batch before it waits for the broker's
    acknowledgements (they were ~20% of the worker's time when it waited);
    its messages are acked once its own outputs are, in batch order.
    """

    def __init__(self, handle: Handle, size: int) -> None:
        self.handle, self.size = handle, size
        self.in_flight: asyncio.Future[None] | None = None

    async def settle(self) -> None:
        """Wait for the batch in flight to be acknowledged and acked (raises what its sends raised)."""
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is not None:
            await in_flight


async def deliver(consumer: Any, fetched: list[Any], generation: int, topics: frozenset[str], handle: Batches) -> None:
    """The worker's messages to `handle` in runs, the rest to Faust's conductor; offsets marked read and acked.

    A fetch a rebalance overtook loses its worker records before its holes are
    looked for: their offsets belong to the generation before (a partition
    back from another worker reads its old offset as a hole), and the
    rebalance seeks them to their committed offsets itself. Its changelog
    records go on: the new generation's recovery may have fetched them, and
    nothing would fetch them again."""
    if consumer.app.consumer_generation_id != generation:
        fetched = [message for message in fetched if message.topic not in topics]
    run: list[Any] = []
    for message in await _new_messages(consumer, fetched):
        if message.topic in topics:
            run.append(message)
            continue
        await _handle_run(consumer, run, generation, handle)
        run = []
        await handle.settle()  # the batches before it are done with the tables
        await consumer.callback(message)  # a changelog record on its way to a table's recovery
        consumer._read_offset[message.tp] = message.offset
    await _handle_run(consumer, run, generation, handle)


async def _new_messages(consumer: Any, fetched: list[Any]) -> list[Any]:
    """The fetched messages not read before; a hole before one is handled as Faust does (faust_fixes re-reads)."""
    fresh = []
    read = consumer._read_offset
    last_in_fetch: dict[Any, int] = {}  # the read offsets move only once a batch is handled
    for message in fetched:
        tp, offset = message.tp, message.offset
        last = last_in_fetch.get(tp, read[tp])
        if last is not None and offset < last:
            continue  # read before a seek moved us back: Faust drops these too
        if last and offset - last > 1 and consumer.app.topics.acks_enabled_for(message.topic):
            await consumer._add_gap(tp, last + 1, offset)
        last_in_fetch[tp] = offset
        fresh.append(message)
    return fresh


async def _handle_run(consumer: Any, run: list[Any], generation: int, batches: Batches) -> None:
    # In batches, not a whole fetch at once: a batch's work holds the event loop
    # (the metrics page) until its sends, and aiokafka's fetches are not capped
    # (`max_poll_records` would leave partitions half drained, and the next
    # fetch then waits out fetch_max_wait_ms on the others). Each batch is acked
    # as soon as it is handled, and none is handled after a rebalance.
    for start in range(0, len(run), batches.size):
        if consumer.app.consumer_generation_id != generation:
            return  # a rebalance came between fetch and now: these partitions are read again by their owner
        await _handle_batch(consumer, run[start : start + batches.size], batches)


async def _handle_batch(consumer: Any, batch: list[Any], batches: Batches) -> None:
    for message in batch:
        consumer._unacked_messages.add(message)  # a graceful stop waits for them (Consumer.wait_empty)
    sent = await batches.handle(batch)
    read = consumer._read_offset
    for message in batch:
        read[message.tp] = message.offset
    await batches.settle()
    batches.in_flight = asyncio.ensure_future(_ack_when_sent(consumer, batch, sent))


async def _ack_when_sent(consumer: Any, batch: list[Any], sent: Awaitable[None]) -> None:
    await sent
    ack = consumer.ack
    for message in batch:
        ack(message)
    commit_every = consumer._commit_every
    if commit_every is not None and consumer._n_acked >= commit_every:
        consumer._n_acked = 0
        await consumer.commit()
