"""The worker's three tables and how a batch reads and writes them.

All three are keyed by raw bytes that start with the user_id, partitioned
like the internal topic, with JSON values:

    users      user_id                     -> the user's `UserState`
               \\0forgotten\\0 P \\0 hash      -> {"at", "user_hash"}: a forgotten user of partition P
    seen       user_id \\0 event_id         -> when the event was first counted (dedupe)
    examples   user_id \\0 %016d sequence   -> a pending `TrainingExample`

A forget (`forget()`, a `ForgetCommand`) drops every key of the user and
leaves the marker, keyed by the salted hash, in the user's partition: the
user's envelopes stamped at or before the forget time are ignored from then
on (also after a restore, since the marker travels with the partition), and
later ones start a new history. The batch then purges the partition's
changelogs (streams/purge.py), so no record of the user survives there either.

In the worker they are Faust tables (changelog-backed, `FaustTable`); `adaptloop
replay` fills `MemoryTable`s with the very same code and writes them to a new
app version's changelogs at the end.
"""

from __future__ import annotations

import functools
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.forgotten import UserHasher
from core.settings import WORKER_TABLES
from schemas.lifecycle import LifecycleEvent
from schemas.privacy import FORGOTTEN_PREFIX
from schemas.training import TrainingExample
from streams.decoding import partition_of
from streams.envelope import Envelope
from streams.processor import BatchStats, Output, UserProcessor
from streams.sending import PHASE_MARKS, PHASE_STATE, ChangelogWriter
from streams.state import UserState

Outgoing = list[tuple[bytes, Output]]


def forgotten_key(partition: int, user_hash: str) -> bytes:
    return FORGOTTEN_PREFIX + b"%d\x00" % partition + user_hash.encode()


def key_partition(key: bytes, partitions: int) -> int:
    """The partition a key of any of the three tables belongs to (its user's; a marker names its own)."""
    if key.startswith(FORGOTTEN_PREFIX):
        return int(key[len(FORGOTTEN_PREFIX) :].split(b"\x00", 1)[0])
    return partition_of(key.split(b"\x00", 1)[0], partitions)


def envelope_time(env: Envelope) -> float:
    """When an envelope happened, by its own stamp: an event's timestamp, a command's requested_at, a lifecycle event's."""
    if env.k == "event":
        return env.event().timestamp.timestamp()
    if env.k == "lifecycle":
        return LifecycleEvent.model_validate(env.body).timestamp.timestamp()
    return env.at or 0.0


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

    @functools.cached_property
    def changelog_topic_name(self) -> str:
        # Fixed once the table exists; asked for on every write (~1.5% of the worker's time when looked up each time).
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

    def __init__(
        self, tables: dict[str, Table], writer: ChangelogWriter, partitions: int, hasher: UserHasher | None = None
    ) -> None:
        """`hasher` None: forget commands are refused (a worker always has one; tests of other parts may not)."""
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
        self.hasher = hasher
        # Every batch looks up each of its users' forget marker by the salted
        # hash: an HMAC per user per batch was ~5% of the worker's time.
        self._user_hash = functools.lru_cache(maxsize=1 << 16)(lambda key: hasher(key.decode())) if hasher else None
        self.to_purge: set[int] = set()  # partitions with a forget in this batch: their changelogs get purged
        self.forgotten_elsewhere: dict[str, float] = {}  # hash -> forget time, from adapter.forgotten (replay)

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
            envelopes = self._honour_forgets(key, envelopes, stats)
            if not envelopes:
                continue
            state = self.load(key)
            outgoing += [(key, r) for r in processor.handle(key.decode(), state, self.user_log(key), envelopes, stats)]
            self.save(key, state)
        return outgoing

    def tick(self, processor: UserProcessor, partition: int, at: float, stats: BatchStats) -> Outgoing:
        """The nightly schedule's tick for every user whose state lives in `partition`."""
        outgoing: Outgoing = []
        users = [k for k in list(self.users.data.keys()) if not k.startswith(FORGOTTEN_PREFIX)]
        for key in [k for k in users if self.partition(k) == partition]:
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

    # ---- forgetting a user ------------------------------------------------- #

    def _honour_forgets(self, key: bytes, envelopes: list[Envelope], stats: BatchStats) -> list[Envelope]:
        """Apply a forget command among `envelopes`; drop what the user's forget covers; the rest goes on."""
        forgets = [e for e in envelopes if e.k == "command" and e.body.get("type") == "forget"]
        if forgets:
            last = max(forgets, key=envelope_time)
            self.forget(key, str(last.body["user_hash"]), envelope_time(last))
        if self._user_hash is None:
            return envelopes
        user_hash = self._user_hash(key)
        marker = self.users.data.get(forgotten_key(self.partition(key), user_hash))
        since = marker["at"] if marker is not None else self.forgotten_elsewhere.get(user_hash)
        if since is None:
            return envelopes
        fresh = self.users.data.get(key) is not None  # a new history has begun since the forget
        rest = [e for e in envelopes if not (e.k == "command" and e.body.get("type") == "forget")]
        # A trainer's late answer about a forgotten job would start a state of nothing: only a new history takes one.
        kept = [e for e in rest if envelope_time(e) > since and (fresh or e.k != "lifecycle")]
        stats.forgotten += len(rest) - len(kept)
        return kept

    def forget(self, key: bytes, user_hash: str, at: float) -> bool:
        """Drop every key of the user and leave the marker; True if this forget was new (a redelivery only purges again)."""
        if self.hasher is None:
            raise ValueError("this worker has no user hasher: it cannot apply a forget")
        if self.hasher(key.decode()) != user_hash:
            raise ValueError(f"the forget command's user_hash is not this store's hash of {key!r}: another salt?")
        partition = self.partition(key)
        marker = forgotten_key(partition, user_hash)
        self.to_purge.add(partition)
        previous = self.users.data.get(marker)
        if previous is not None and previous["at"] >= at:
            return False
        prefix = key + b"\x00"
        self._live.pop(key, None)
        # Tombstones too, though the purge deletes every record before it: if the
        # worker dies before the purge, a restore must not bring the user back.
        self.writer.delete(self.users, partition, key, PHASE_STATE)
        for table in (self.seen, self.examples):
            for owned in [k for k in list(table.data.keys()) if k.startswith(prefix)]:
                self.writer.delete(table, partition, owned, PHASE_STATE)
        self.writer.put(self.users, partition, marker, {"at": at, "user_hash": user_hash}, PHASE_STATE)
        return True

    def user_count(self) -> int:
        return sum(1 for key in self.users.data if not key.startswith(FORGOTTEN_PREFIX))

    def changelog_topics(self) -> list[str]:
        return [table.changelog_topic_name for table in (self.users, self.seen, self.examples)]

    def live_records(self, partition: int) -> dict[str, dict[bytes, Any]]:
        """Every key of `partition` in each table, with its value (what a purge writes again)."""
        return {
            table.changelog_topic_name: {
                k: v for k, v in list(table.data.items()) if key_partition(k, self.partitions) == partition
            }
            for table in (self.users, self.seen, self.examples)
        }
