"""`adaptloop replay`: rebuild the worker's tables and datasets from a point in time.

    adaptloop replay --from 2026-11-01T00:00:00Z [--to T] [--topics feedback,commands]
                     [--user-id U] [--app-id NEW] [--out DIR] [--emit-requests] [--dry-run]

1. Plan: offsets_for_times(--from) up to offsets_for_times(--to) (or the end
   as of now) for every partition of the selected topics (default: the four
   input topics, the commands and the lifecycle). `--dry-run` prints it.
2. Run: read exactly those records (assign(), no group), merge the partitions
   by timestamp (each partition keeps its order) and feed them one by one
   through the worker's own code: same validation, curation, triggers and
   dataset snapshots. (The live worker handles a batch of a user's events at
   once, so under load a live snapshot may take in events just past its
   trigger; the replay snapshots at the triggering event itself.)
3. Output, under a new app version (`<app_id>-replay-<UTC stamp>` or --app-id):
   datasets in `<storage_root>/replays/<app version>/` (or --out), the
   training requests it would have sent in `requests.jsonl` there (sent to
   the live requests topic only with --emit-requests), and, for a replay of
   every topic for every user, the rebuilt tables on the new app version's
   changelog topics with that consumer group's offsets committed at the
   plan's end: a worker started with `streams.app_id: <app version>` takes
   over from exactly there.

The live consumer group, its tables and its datasets are never touched.
Memory grows with the replayed range (records are merged in memory); replay
long histories in a few --from/--to windows.
"""

from __future__ import annotations

import heapq
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, TopicPartition

from core.encryption import sealer_for
from core.errors import InvalidMessage, KafkaOperationError
from core.forgotten import UserHasher
from core.kafka.client import ClientConfig
from core.kafka.io import OffsetRange, Record, offset_ranges, produce, read_ranges, read_since
from core.kafka.topics import TopicPlan, ensure_topics
from core.settings import CHANGELOG_TOPIC_CONFIG, WORKER_TABLES, changelog_topic
from core.storage import ArtifactStore
from schemas import ForgottenRecord, RollbackCommand, TrainingRequest
from streams.config import WorkerConfig
from streams.decoding import SourceDecoder
from streams.processor import BatchStats, UserProcessor
from streams.sending import ChangelogWriter, table_value
from streams.tables import MemoryTable, Outgoing, WorkerTables, key_partition


def default_app_id(live_app_id: str, now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{live_app_id}-replay-{stamp}"


@dataclass(frozen=True)
class ReplayPlan:
    app_id: str
    from_ms: int
    to_ms: int | None
    user_id: str | None
    ranges: tuple[OffsetRange, ...]
    complete: bool  # every default topic, every user: the tables can be handed over

    @property
    def total(self) -> int:
        return sum(r.count for r in self.ranges)

    def lines(self) -> list[str]:
        def when(ms: int | None) -> str:
            return "now" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat()

        out = [
            f"replay {when(self.from_ms)} .. {when(self.to_ms)} into app version {self.app_id}"
            + (f", user {self.user_id} only" if self.user_id else "")
        ]
        out += [f"  {r.topic}[{r.partition}] offsets {r.start}..{r.end}: {r.count} record(s)" for r in self.ranges]
        out.append(
            f"  {self.total} record(s) in all; "
            + (
                "tables and offsets go to the new app version"
                if self.complete
                else "a partial replay: datasets only, no tables or offsets written"
            )
        )
        return out


def plan_replay(
    client: ClientConfig,
    topics: list[str],
    from_ms: int,
    to_ms: int | None,
    app_id: str,
    user_id: str | None,
    complete_topics: list[str],
) -> ReplayPlan:
    if to_ms is not None and to_ms <= from_ms:
        raise KafkaOperationError("--to must be later than --from")
    ranges = offset_ranges(client, topics, from_ms, to_ms)
    complete = user_id is None and set(topics) == set(complete_topics)
    return ReplayPlan(app_id, from_ms, to_ms, user_id, tuple(ranges), complete)


@dataclass
class ReplayResult:
    records: int = 0
    events: int = 0
    dead_letters: int = 0
    other_users: int = 0
    users: int = 0
    requests: list[TrainingRequest] = field(default_factory=list)
    commands: list[RollbackCommand] = field(default_factory=list)
    tables_written: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def merged_by_time(records: list[Record]) -> list[Record]:
    """Partitions merged by timestamp; each partition keeps its offset order (heapq.merge is stable per input)."""
    by_partition: dict[tuple[str, int], list[Record]] = {}
    for record in records:
        by_partition.setdefault((record.topic, record.partition), []).append(record)
    return list(heapq.merge(*by_partition.values(), key=lambda r: r.timestamp_ms))


def memory_tables(partitions: int, hasher: UserHasher | None = None) -> WorkerTables:
    """The worker's tables in dicts, filled by the worker's own code (nothing is sent while they fill)."""
    return WorkerTables({name: MemoryTable(name) for name in WORKER_TABLES}, ChangelogWriter(None), partitions, hasher)


def read_forgotten(client: ClientConfig, topic: str, timeout: float = 60.0) -> dict[str, float]:
    """Every forgotten user's salted hash and latest forget time (epoch seconds), from `adapter.forgotten`."""
    forgotten: dict[str, float] = {}
    for record in read_since(client, [topic], 0, timeout, missing_ok=True):
        if record.value is not None:
            parsed = ForgottenRecord.model_validate_json(record.value)
            forgotten[parsed.user_hash] = max(forgotten.get(parsed.user_hash, 0.0), parsed.forgotten_at.timestamp())
    return forgotten


def apply_records(
    records: list[Record],
    decoder: SourceDecoder,
    processor: UserProcessor,
    tables: WorkerTables,
    only: set[bytes] | None = None,
    progress=None,
) -> tuple[Outgoing, BatchStats, int, int]:
    """Feed records one at a time through the worker's code: (outgoing, stats, invalid, other users' records).

    `only`: the user keys to apply (records of other users are counted, not applied).
    """
    outgoing: Outgoing = []
    stats = BatchStats()
    invalid = others = 0
    for done, record in enumerate(records, start=1):
        try:
            key, env = decoder(record.topic, record.partition, record.offset, record.value)
        except InvalidMessage:
            invalid += 1  # dead-lettered live already; counted, not sent again
            continue
        if only is not None and key not in only:
            others += 1
            continue
        # One record at a time: a trigger fires at the very event that crosses
        # it, whatever batches the live worker happened to see.
        outgoing += tables.apply(processor, {key: [env]}, stats)
        if progress is not None and (done % 1000 == 0 or done == len(records)):
            progress(done, len(records))
    return outgoing, stats, invalid, others


def run_replay(plan: ReplayPlan, cfg: WorkerConfig, out_dir: Path, *, emit_requests: bool = False, progress=None) -> ReplayResult:
    """Carry out `plan` with the worker's code; see the module docstring for what is written where."""
    started = time.monotonic()
    result = ReplayResult()
    out_dir.mkdir(parents=True, exist_ok=True)
    decoder = SourceDecoder(cfg.input_topics, cfg.commands_topic, cfg.max_event_bytes)
    processor = UserProcessor(cfg.processor, ArtifactStore(str(out_dir), sealer_for(cfg.storage_root, cfg.encryption)))
    tables = memory_tables(cfg.internal_partitions, UserHasher.for_store(ArtifactStore(cfg.storage_root)))
    # Users forgotten since (or before) these events: their older events build nothing.
    tables.forgotten_elsewhere = read_forgotten(cfg.client, cfg.forgotten_topic)
    records = merged_by_time(list(read_ranges(cfg.client, list(plan.ranges))))
    only = {plan.user_id.encode()} if plan.user_id else None
    outgoing, stats, result.dead_letters, result.other_users = apply_records(records, decoder, processor, tables, only, progress)
    result.records, result.events, result.users = len(records), stats.events, tables.user_count()
    result.requests = [m for _, m in outgoing if isinstance(m, TrainingRequest)]
    result.commands = [m for _, m in outgoing if isinstance(m, RollbackCommand)]
    with open(out_dir / "requests.jsonl", "wb") as fh:
        for request in result.requests:
            fh.write(request.to_bytes() + b"\n")
    if emit_requests and result.requests:
        produce(cfg.client, cfg.requests_topic, [(r.user_id, r.to_bytes()) for r in result.requests])
    if plan.complete:
        result.tables_written = _hand_over(plan, cfg, tables)
    summary = {
        "app_id": plan.app_id,
        "from_ms": plan.from_ms,
        "to_ms": plan.to_ms,
        "user_id": plan.user_id,
        "ranges": [r.__dict__ for r in plan.ranges],
        "records": result.records,
        "events": result.events,
        "dead_letters": result.dead_letters,
        "users": result.users,
        "requests": [r.request_id for r in result.requests],
        "tables_written": result.tables_written,
    }
    (out_dir / "replay.json").write_text(json.dumps(summary, indent=2))
    result.seconds = time.monotonic() - started
    return result


def _hand_over(plan: ReplayPlan, cfg: WorkerConfig, tables: WorkerTables) -> dict[str, int]:
    """Write the rebuilt tables to the new app version's changelogs and commit its offsets at the plan's end."""
    compacted = tuple(CHANGELOG_TOPIC_CONFIG.items())
    ensure_topics(
        cfg.client, [TopicPlan(changelog_topic(plan.app_id, n), cfg.internal_partitions, 1, compacted) for n in WORKER_TABLES]
    )
    written = {}
    for name, table in zip(WORKER_TABLES, (tables.users, tables.seen, tables.examples)):
        # Each key goes to its user's partition, as the worker writes them.
        messages = [
            (key, table_value(value), None, key_partition(key, cfg.internal_partitions)) for key, value in table.data.items()
        ]
        written[name] = produce(cfg.client, changelog_topic(plan.app_id, name), messages)
    consumer = Consumer(cfg.client.librdkafka(**{"group.id": plan.app_id, "enable.auto.commit": False}))
    try:
        consumer.commit(offsets=[TopicPartition(r.topic, r.partition, r.end) for r in plan.ranges], asynchronous=False)
    except KafkaException as exc:
        raise KafkaOperationError(f"committing the offsets of {plan.app_id} failed: {exc}") from None
    finally:
        consumer.close()
    return written
