"""`adaptloop generate-data`: build a user's dataset offline from the input topics.

    adaptloop generate-data --user-id alice --output alice.jsonl [--include-global] [--since 2026-11-01T00:00:00Z]

The seed's `synthetic_data_generator.py`: reads the input topics from a point
in time (no consumer group, nothing committed), validates and curates with the
very functions the worker uses, and writes the training split to OUTPUT and
the held-out split next to it (`alice.test.jsonl`). Invalid messages are
counted and skipped, never fatal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adaptloop.errors import InvalidMessage
from adaptloop.kafka.client import ClientConfig
from adaptloop.kafka.io import read_since
from schemas.decode import decode
from schemas.events import EVENT_TYPE_BY_INPUT_KIND
from schemas.training import Provenance, TrainingExample
from streams.curation import GLOBAL_USER, CurationConfig, augment, curate
from streams.dataset import DatasetConfig, build_dataset, dedupe, to_jsonl
from streams.state import MemoryUserLog, UserState, apply_event, pending_examples


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


def generate_dataset(
    client: ClientConfig,
    input_topics: dict[str, str],
    user_id: str,
    output: Path,
    *,
    since_ms: int = 0,
    include_global: bool = False,
    curation: CurationConfig = CurationConfig(),
    dataset: DatasetConfig = DatasetConfig(),
    max_event_bytes: int = 64 * 1024,
    max_pending: int = 100_000,
) -> GenerateResult:
    kind_by_topic = {topic: kind for kind, topic in input_topics.items()}
    state = UserState()
    log = MemoryUserLog()
    global_examples: list[TrainingExample] = []
    events = invalid = 0
    records = sorted(read_since(client, list(input_topics.values()), since_ms), key=lambda r: (r.timestamp_ms, r.topic, r.partition, r.offset))
    for record in records:
        model = EVENT_TYPE_BY_INPUT_KIND[kind_by_topic[record.topic]]
        try:
            event = decode(model, record.value, max_event_bytes)
        except InvalidMessage:
            invalid += 1
            continue
        if event.user_id not in (user_id, GLOBAL_USER):
            continue
        events += 1
        curated = curate(event, Provenance(topic=record.topic, partition=record.partition, offset=record.offset), curation)
        if curated.to_global:
            global_examples.extend(curated.examples)
        elif event.user_id == user_id:
            apply_event(state, log, event.event_id, event.timestamp.timestamp(), curated, curation,
                        max_pending=max_pending, accuracy_window=20)  # fmt: skip
    train, test = build_dataset(
        dedupe(augment(pending_examples(state, log), curation.paraphrases, curation.seed)), replay_pool=[], global_pool=dedupe(global_examples),
        include_global=include_global, cfg=dataset, user_id=user_id,
    )  # fmt: skip
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(to_jsonl(train))
    test_out = test_path_for(output)
    test_out.write_bytes(to_jsonl(test))
    return GenerateResult(train, test, events, invalid, output, test_out)
