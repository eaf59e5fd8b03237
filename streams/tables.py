"""The worker's three tables and how a batch reads and writes them.

All three are keyed by raw bytes that start with the user_id, partitioned
like the internal topic, with JSON values:

    users      user_id                     -> the user's `UserState`
    seen       user_id \\0 event_id         -> when the event was first counted (dedupe)
    examples   user_id \\0 %016d sequence   -> a pending `TrainingExample`

In the worker they are Faust tables (changelog-backed, `FaustTable`); `adaptloop
replay` fills `MemoryTable`s with the very same code and writes them to a new
app version's changelogs at the end.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.settings import WORKER_TABLES
from schemas.training import TrainingExample
from streams.decoding import partition_of
from streams.envelope import Envelope
from streams.processor import BatchStats, Output, UserProcessor
from streams.sending import PHASE_MARKS, PHASE_STATE, ChangelogWriter
from streams.state import UserState

Outgoing = list[tuple[bytes, Output]]


class Table(Protocol):
    name: str
    data: MutableMapping[bytes, Any]

    @property
    def changelog_topic_name(self) -> str: ...


@dataclass
class MemoryTable:
    """A table in a dict (replay, tests)."""

    name: str
    data: dict[bytes, Any] = field(default_factory=dict)
    changelog_topic_name: str = ""


class FaustTable:
    """A Faust table seen through the `Table` protocol."""

    def __init__(self, table) -> None:
        self.table = table
        self.name = table.name

    @property
    def data(self) -> MutableMapping[bytes, Any]:
        return self.table.data

    @property
    def changelog_topic_name(self) -> str:
        return self.table.changelog_topic.get_topic_name()


class TableUserLog:
    """A user's `UserLog` (counted event ids, pending examples) in the `seen` and `examples` tables."""

    def __init__(
        self, user_key: bytes, partition: int, seen_table: Table, examples_table: Table, writer: ChangelogWriter
    ) -> None:
        self.prefix = user_key + b"\x00"
        self.writer = writer
        self.partition = partition
        self.seen_table = seen_table
        self.examples_table = examples_table

    def seen(self, event_id: str) -> bool:
        return self.prefix + event_id.encode() in self.seen_table.data

    def mark_seen(self, event_id: str, at: float) -> None:
        # Wall-clock time of first sight: old (backfilled) events are remembered too.
        # Sent after the state (PHASE_MARKS): see UserProcessor._repair_after_crash.
        self.writer.put(self.seen_table, self.partition, self.prefix + event_id.encode(), time.time(), PHASE_MARKS)

    def _example_key(self, seq: int) -> bytes:
        return self.prefix + b"%016d" % seq

    def get_example(self, seq: int) -> TrainingExample | None:
        raw = self.examples_table.data.get(self._example_key(seq))
        return None if raw is None else TrainingExample.model_validate(raw)

    def put_example(self, seq: int, example: TrainingExample) -> None:
        value = example.model_dump(mode="json", exclude_none=True)
        self.writer.put(self.examples_table, self.partition, self._example_key(seq), value)

    def drop_example(self, seq: int) -> None:
        self.writer.delete(self.examples_table, self.partition, self._example_key(seq))


class WorkerTables:
    """Loads and saves users' states (one load and one save per user per batch) and their logs."""

    def __init__(self, tables: dict[str, Table], writer: ChangelogWriter, partitions: int) -> None:
        missing = set(WORKER_TABLES) - set(tables)
        if missing:
            raise ValueError(f"the worker needs the tables {sorted(missing)}")
        self.users, self.seen, self.examples = (tables[name] for name in WORKER_TABLES)
        self.writer = writer
        self.partitions = partitions
        # Parsed states by key, valid while the table still holds the very dict we
        # wrote (recovery or a rebalance put new objects there): parsing a user's
        # state once per batch cost more than the work on it.
        self._live: dict[bytes, tuple[Any, UserState]] = {}

    def partition(self, key: bytes) -> int:
        return partition_of(key, self.partitions)

    def load(self, key: bytes) -> UserState:
        raw = self.users.data.get(key)
        cached = self._live.get(key)
        if cached is not None and cached[0] is raw:
            return cached[1]
        return UserState.load(raw)

    def save(self, key: bytes, state: UserState) -> None:
        value = state.dump()
        self._live[key] = (value, state)
        self.writer.put(self.users, self.partition(key), key, value, PHASE_STATE)

    def user_log(self, key: bytes) -> TableUserLog:
        return TableUserLog(key, self.partition(key), self.seen, self.examples, self.writer)

    def apply(self, processor: UserProcessor, by_user: dict[bytes, list[Envelope]], stats: BatchStats) -> Outgoing:
        """Each user's envelopes applied to the user's state; the training requests and commands to send."""
        outgoing: Outgoing = []
        for key, envelopes in by_user.items():
            state = self.load(key)
            outgoing += [(key, r) for r in processor.handle(key.decode(), state, self.user_log(key), envelopes, stats)]
            self.save(key, state)
        return outgoing

    def tick(self, processor: UserProcessor, partition: int, at: float, stats: BatchStats) -> Outgoing:
        """The nightly schedule's tick for every user whose state lives in `partition`."""
        outgoing: Outgoing = []
        for key in [k for k in list(self.users.data.keys()) if self.partition(k) == partition]:
            state = self.load(key)
            produced = processor.on_tick(key.decode(), state, self.user_log(key), at, stats)
            if produced:
                outgoing += [(key, r) for r in produced]
                self.save(key, state)
        return outgoing

    def forget_marks_before(self, cutoff: float, writer: ChangelogWriter) -> int:
        """Drop event-id marks first seen before `cutoff` (bounds the dedupe memory); returns how many."""
        expired = [k for k, at in list(self.seen.data.items()) if at is not None and at < cutoff]
        for key in expired:
            writer.delete(self.seen, self.partition(key.split(b"\x00", 1)[0]), key)
        return len(expired)
