"""The worker's tables: a forget drops every key of the user, keeps a hashed marker, and decides what comes after."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core.forgotten import UserHasher
from core.storage import ArtifactStore
from schemas.privacy import FORGOTTEN_PREFIX
from streams.decoding import partition_of
from streams.envelope import Envelope
from streams.processor import BatchStats, ProcessorConfig, UserProcessor
from streams.replay import memory_tables
from streams.tables import key_partition
from streams.triggers import TriggerConfig

pytestmark = pytest.mark.unit

PARTITIONS = 3
FORGET_AT = datetime(2026, 6, 1, tzinfo=UTC).timestamp()


def _correction(user: str, n: int, day: int = 1, month: int = 1) -> Envelope:
    body = {
        "event_id": f"{user}-c{n}-{month}",
        "user_id": user,
        "timestamp": f"2026-{month:02d}-{day:02d}T00:00:{n:02d}Z",
        "kind": "correction",
        "query": f"Where did {user} hide key {n}?",
        "response": "x",
        "correction": f"{user} hid key {n} under the mat.",
    }
    return Envelope(k="event", kind="feedback", body=body)


def _forget(hasher: UserHasher, user: str, at: float = FORGET_AT) -> Envelope:
    body = {"type": "forget", "command_id": f"forget-{user}", "user_id": user, "user_hash": hasher(user)}
    return Envelope(k="command", body=body, at=at)


def _setup(tmp_path):
    hasher = UserHasher.for_store(ArtifactStore(str(tmp_path / "store")))
    tables = memory_tables(PARTITIONS, hasher)
    cfg = ProcessorConfig.from_settings(triggers=TriggerConfig.from_settings(min_gap_events=100, cooldown_s=0))
    return hasher, tables, UserProcessor(cfg, ArtifactStore(str(tmp_path / "out")))


def _everything(tables) -> bytes:
    return repr([t.data for t in (tables.users, tables.seen, tables.examples)]).encode()


def test_a_forget_drops_every_key_of_the_user_and_keeps_only_a_hashed_marker(tmp_path):
    hasher, tables, proc = _setup(tmp_path)
    tables.apply(proc, {b"zelda": [_correction("zelda", n) for n in range(4)], b"olga": [_correction("olga", 0)]}, BatchStats())
    assert b"zelda" in _everything(tables)
    olga = {
        t.name: {k: v for k, v in t.data.items() if k.startswith(b"olga")} for t in (tables.users, tables.seen, tables.examples)
    }

    stats = BatchStats()
    tables.apply(proc, {b"zelda": [_forget(hasher, "zelda")]}, stats)

    assert b"zelda" not in _everything(tables), "no key or value names the user"
    (marker,) = [k for k in tables.users.data if k.startswith(FORGOTTEN_PREFIX)]
    assert marker.endswith(hasher("zelda").encode()) and tables.users.data[marker]["at"] == FORGET_AT
    assert key_partition(marker, PARTITIONS) == partition_of(b"zelda", PARTITIONS), "the marker lives with the user"
    assert tables.to_purge == {partition_of(b"zelda", PARTITIONS)}
    assert {
        t.name: {k: v for k, v in t.data.items() if k.startswith(b"olga")} for t in (tables.users, tables.seen, tables.examples)
    } == olga, "another user keeps everything"
    assert tables.user_count() == 1


def test_after_a_forget_older_envelopes_are_ignored_and_newer_ones_start_a_new_history(tmp_path):
    hasher, tables, proc = _setup(tmp_path)
    tables.apply(proc, {b"zelda": [_correction("zelda", n) for n in range(4)]}, BatchStats())
    tables.apply(proc, {b"zelda": [_forget(hasher, "zelda")]}, BatchStats())

    stats = BatchStats()
    late_answer = Envelope(
        k="lifecycle",
        body={"event_id": "l1", "type": "training_skipped", "user_id": "zelda", "timestamp": "2026-07-01T00:00:00Z"},
    )
    tables.apply(proc, {b"zelda": [_correction("zelda", n) for n in range(4)] + [late_answer]}, stats)
    assert stats.forgotten == 5 and b"zelda" not in _everything(tables), "redelivered old events, a trainer's late answer"

    tables.apply(proc, {b"zelda": [_correction("zelda", 9, month=7)]}, BatchStats())
    state = tables.users.data[b"zelda"]
    assert state["events_total"] == 1, "a new history from nothing"

    # The forget command delivered again (at-least-once) wipes nothing of the new history.
    tables.apply(proc, {b"zelda": [_forget(hasher, "zelda")]}, BatchStats())
    assert tables.users.data[b"zelda"]["events_total"] == 1


def test_a_forget_and_events_in_one_batch_keep_only_the_events_after_it(tmp_path):
    hasher, tables, proc = _setup(tmp_path)
    batch = [_correction("zelda", 1, month=7), _forget(hasher, "zelda"), _correction("zelda", 2)]
    stats = BatchStats()
    tables.apply(proc, {b"zelda": batch}, stats)
    assert stats.forgotten == 1 and tables.users.data[b"zelda"]["events_total"] == 1


def test_forgets_known_from_the_forgotten_topic_hold_without_a_marker(tmp_path):
    """What `adaptloop replay` does: it reads adapter.forgotten first, then replays the events."""
    hasher, tables, proc = _setup(tmp_path)
    tables.forgotten_elsewhere = {hasher("zelda"): FORGET_AT}
    tables.apply(proc, {b"zelda": [_correction("zelda", n) for n in range(4)], b"olga": [_correction("olga", 0)]}, BatchStats())
    assert b"zelda" not in _everything(tables) and tables.user_count() == 1


def test_a_forget_with_another_stores_hash_is_refused(tmp_path):
    hasher, tables, proc = _setup(tmp_path)
    other = UserHasher(b"another salt of sixteen bytes or more")
    with pytest.raises(ValueError, match="another salt"):
        tables.apply(proc, {b"zelda": [_forget(other, "zelda")]}, BatchStats())
