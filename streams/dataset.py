"""Dataset snapshots: new examples + replay + global, a held-out split, written once.

Layout in the artifact store (the seed's names):
    data/adapter_training/user_<id>_finetune.jsonl            the latest training split
    data/adapter_training/versions/user_<id>/<sha256>.jsonl    immutable, by content
    data/adapter_training/versions/user_<id>/<sha256>.test.jsonl
    data/adapter_training/versions/user_<id>/<sha256>.manifest.json
    data/adapter_training/global/<sha256>.jsonl                the global pool, content-addressed

Held-out split: for each taught item that has several prompts (the examples
sharing an event_id), one paraphrase (never the original wording) is held out,
so validation asks about something taught, in words never trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from adaptloop.storage import ArtifactStore, sha256_bytes
from schemas.training import DatasetRef, OffsetRange, TrainingExample
from streams.curation import dedupe

TRAINING_DIR = "data/adapter_training"


@dataclass(frozen=True)
class DatasetConfig:
    replay_max: int = 64
    global_max: int = 64
    seed: int = 13


def _rank(seed: int, *parts: str) -> str:
    return hashlib.sha256("\x1f".join((str(seed), *parts)).encode()).hexdigest()


def _pair(example: TrainingExample) -> tuple[str, str]:
    return example.prompt.strip().casefold(), example.response.strip()


def split_holdout(examples: list[TrainingExample], seed: int) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """(train, test): one paraphrase of every multi-prompt item is held out; order is kept."""
    groups: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(example.event_id or f"response:{example.response}", []).append(i)
    held: set[int] = set()
    for members in groups.values():
        prompts = {examples[i].prompt for i in members}
        if len(prompts) < 2:
            continue
        # The first member is the original wording; hold out one of the others.
        candidates = [i for i in members[1:] if examples[i].prompt != examples[members[0]].prompt]
        if candidates:
            held.add(min(candidates, key=lambda i: _rank(seed, examples[i].prompt)))
    test = [examples[i] for i in sorted(held)]
    test_pairs = {_pair(e) for e in test}
    train = [e for i, e in enumerate(examples) if i not in held and _pair(e) not in test_pairs]
    return train, test


def sample(pool: Iterable[TrainingExample], k: int, seed: int, salt: str) -> list[TrainingExample]:
    """A deterministic sample of at most `k` examples."""
    items = list(pool)
    if k <= 0 or not items:
        return []
    items.sort(key=lambda e: _rank(seed, salt, e.prompt, e.response))
    return items[:k]


def build_dataset(
    new: list[TrainingExample],
    *,
    replay_pool: list[TrainingExample],
    global_pool: list[TrainingExample],
    include_global: bool,
    cfg: DatasetConfig,
    user_id: str,
) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """(train, test) for one request; test holds only held-out new examples."""
    train_new, test = split_holdout(new, cfg.seed)
    test_pairs = {_pair(e) for e in test}
    new_pairs = {_pair(e) for e in train_new}
    replay = [
        e.model_copy(update={"source": "replay"})
        for e in sample((e for e in replay_pool if _pair(e) not in new_pairs | test_pairs), cfg.replay_max, cfg.seed, user_id)
    ]
    glob: list[TrainingExample] = []
    if include_global:
        glob = [
            e.model_copy(update={"source": "global"})
            for e in sample((e for e in global_pool if _pair(e) not in test_pairs), cfg.global_max, cfg.seed, "global")
        ]
    return dedupe(train_new + replay + glob), test


def lineage(examples: Iterable[TrainingExample]) -> list[OffsetRange]:
    """Offset ranges (inclusive) per topic partition of the events behind `examples`."""
    ranges: dict[tuple[str, int], list[int]] = {}
    for example in examples:
        p = example.provenance
        if p is None:
            continue
        lo_hi = ranges.setdefault((p.topic, p.partition), [p.offset, p.offset])
        lo_hi[0] = min(lo_hi[0], p.offset)
        lo_hi[1] = max(lo_hi[1], p.offset)
    return [OffsetRange(topic=t, partition=p, first_offset=lo, last_offset=hi) for (t, p), (lo, hi) in sorted(ranges.items())]


def to_jsonl(examples: Iterable[TrainingExample]) -> bytes:
    return b"".join(e.model_dump_json(exclude_none=True).encode() + b"\n" for e in examples)


def from_jsonl(data: bytes) -> list[TrainingExample]:
    return [TrainingExample.model_validate_json(line) for line in data.splitlines() if line.strip()]


def write_dataset(
    store: ArtifactStore,
    user_id: str,
    train: list[TrainingExample],
    test: list[TrainingExample],
    *,
    trigger: str,
    lineage_ranges: list[OffsetRange],
) -> DatasetRef:
    """Write the split files and a manifest; return the reference a request carries."""
    body = to_jsonl(train)
    test_body = to_jsonl(test)
    sha = sha256_bytes(body)
    base = f"{TRAINING_DIR}/versions/user_{user_id}/{sha}"
    uri = store.write_bytes(f"{base}.jsonl", body)
    test_uri = store.write_bytes(f"{base}.test.jsonl", test_body)
    counts = dict(sorted(Counter(e.source for e in train).items()))
    manifest = {
        "user_id": user_id,
        "sha256": sha,
        "test_sha256": sha256_bytes(test_body),
        "train_count": len(train),
        "test_count": len(test),
        "example_counts": counts,
        "trigger": trigger,
        "lineage": [r.model_dump() for r in lineage_ranges],
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    store.write_bytes(f"{base}.manifest.json", json.dumps(manifest, indent=2).encode())
    store.write_bytes(f"{TRAINING_DIR}/user_{user_id}_finetune.jsonl", body)
    return DatasetRef(
        uri=uri,
        sha256=sha,
        example_counts=counts,
        test_uri=test_uri,
        test_sha256=manifest["test_sha256"],
        test_count=len(test),
    )


def read_examples(store: ArtifactStore, uri: str) -> list[TrainingExample]:
    return from_jsonl(store.read_bytes(store.relative_from_uri(uri)))


def write_global(store: ArtifactStore, examples: list[TrainingExample]) -> str:
    """Add examples to the global pool; content-addressed, so a retry writes the same file."""
    body = to_jsonl(examples)
    return store.write_bytes(f"{TRAINING_DIR}/global/{sha256_bytes(body)}.jsonl", body)


def read_global(store: ArtifactStore) -> list[TrainingExample]:
    out: list[TrainingExample] = []
    for rel in store.list(f"{TRAINING_DIR}/global"):
        if rel.endswith(".jsonl"):
            out.extend(from_jsonl(store.read_bytes(rel)))
    return dedupe(out)
