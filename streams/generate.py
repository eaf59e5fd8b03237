"""`adaptloop generate-data`: build a user's dataset offline from the input topics.

    adaptloop generate-data --user-id alice --output alice.jsonl [--include-global] [--since 2026-11-01T00:00:00Z]

The seed's `synthetic_data_generator.py`: reads the input topics from a point
in time (no consumer group, nothing committed), merges the partitions by time
and runs the user's events (and the global pool's) through the worker's own
processor, as `adaptloop replay` does, with the automatic triggers off; then
writes the user's dataset as a request would snapshot it: the training split
to OUTPUT and the held-out split next to it (`alice.test.jsonl`). Invalid
messages are counted and skipped, never fatal.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from core.kafka.io import read_since
from core.storage import ArtifactStore
from schemas.dataset import to_jsonl
from schemas.training import TrainingExample
from streams.config import WorkerConfig
from streams.curation import GLOBAL_USER
from streams.decoding import SourceDecoder
from streams.processor import UserProcessor
from streams.replay import apply_records, memory_tables, merged_by_time


@dataclass(frozen=True)
class GenerateResult:
    train: list[TrainingExample]
    test: list[TrainingExample]
    events: int
    invalid: int
    train_path: Path
    test_path: Path


def test_path_for(output: Path) -> Path:
    return output.with_name(output.stem + ".test" + (output.suffix or ".jsonl"))


def offline_processor(cfg: WorkerConfig, store: ArtifactStore) -> UserProcessor:
    """The worker's processor with every automatic trigger and rollback off: it only curates and counts."""
    triggers = replace(cfg.processor.triggers, schedule="on-demand", accuracy_drop=False)
    asks = cfg.processor.active.model_copy(update={"enabled": False})  # no labelling tasks offline
    return UserProcessor(replace(cfg.processor, triggers=triggers, auto_rollback=False, active=asks), store)


def generate_dataset(
    cfg: WorkerConfig, user_id: str, output: Path, *, since_ms: int = 0, include_global: bool = False
) -> GenerateResult:
    records = merged_by_time(list(read_since(cfg.client, list(cfg.input_topics.values()), since_ms)))
    decoder = SourceDecoder(cfg.input_topics, cfg.commands_topic, cfg.max_event_bytes)
    tables = memory_tables(cfg.internal_partitions)
    with tempfile.TemporaryDirectory(prefix="adaptloop-generate-") as scratch:  # the global pool as the worker keeps it
        processor = offline_processor(cfg, ArtifactStore(scratch))
        user = user_id.encode()
        _, _stats, invalid, _ = apply_records(records, decoder, processor, tables, only={user, GLOBAL_USER.encode()})
        state = tables.load(user)
        train, test, _ = processor.dataset_for(user_id, state, tables.user_log(user), include_global)
    events = sum(tables.load(key).events_total for key in (user, GLOBAL_USER.encode()) if key in tables.users.data)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(to_jsonl(train))
    test_out = test_path_for(output)
    test_out.write_bytes(to_jsonl(test))
    return GenerateResult(train, test, events, invalid, output, test_out)
