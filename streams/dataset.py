"""Dataset snapshots: new examples + replay + global, a held-out split, written once.

Layout in the artifact store (the seed's names):
    data/adapter_training/user_<id>_finetune.jsonl            the latest training split
    data/adapter_training/versions/user_<id>/<sha256>.jsonl    immutable, by content
    data/adapter_training/versions/user_<id>/<sha256>.test.jsonl
    data/adapter_training/versions/user_<id>/<sha256>.manifest.json
    data/adapter_training/global/<sha256>.jsonl                the global pool, content-addressed

The line format, the held-out split and the manifest are the contract with
the trainer: `schemas.dataset`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace

from core.settings import Settings, defaults
from core.storage import ArtifactStore, sha256_bytes
from schemas.dataset import DatasetManifest, example_pair, from_jsonl, rank, split_holdout, to_jsonl
from schemas.training import DatasetRef, OffsetRange, TrainingExample
from streams.curation import dedupe

TRAINING_DIR = "data/adapter_training"


def user_versions_dir(user_id: str) -> str:
    """Where a user's immutable datasets (with their held-out splits and manifests) live in the store."""
    return f"{TRAINING_DIR}/versions/user_{user_id}"


def latest_split_file(user_id: str) -> str:
    """The user's latest training split (the seed's `user_<id>_finetune.jsonl`)."""
    return f"{TRAINING_DIR}/user_{user_id}_finetune.jsonl"


@dataclass(frozen=True)
class DatasetConfig:
    replay_max: int
    global_max: int
    seed: int

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides) -> DatasetConfig:
        s = settings or defaults()
        config = cls(
            replay_max=s.streams.dataset.replay_max, global_max=s.streams.dataset.global_max, seed=s.streams.curation.seed
        )
        return replace(config, **overrides)


def sample(pool: Iterable[TrainingExample], k: int, seed: int, salt: str) -> list[TrainingExample]:
    """A deterministic sample of at most `k` examples."""
    items = list(pool)
    if k <= 0 or not items:
        return []
    items.sort(key=lambda e: rank(seed, salt, e.prompt, e.response))
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
    test_pairs = {example_pair(e) for e in test}
    new_pairs = {example_pair(e) for e in train_new}
    replayable = (e for e in replay_pool if example_pair(e) not in new_pairs | test_pairs)
    replay = [e.model_copy(update={"source": "replay"}) for e in sample(replayable, cfg.replay_max, cfg.seed, user_id)]
    glob: list[TrainingExample] = []
    if include_global:
        usable = (e for e in global_pool if example_pair(e) not in test_pairs)
        glob = [e.model_copy(update={"source": "global"}) for e in sample(usable, cfg.global_max, cfg.seed, "global")]
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
    base = f"{user_versions_dir(user_id)}/{sha}"
    # Sealed once for both files that hold it, and both bodies sealed back to back, before any write: the
    # second seal finds the cipher's code and tables still in the CPU's caches (about 0.1 ms less per dataset).
    stored = store.personal_bytes(body, user_id, sha)
    test_stored = store.personal_bytes(test_body, user_id)
    uri = store.write_bytes(f"{base}.jsonl", stored)
    test_uri = store.write_bytes(f"{base}.test.jsonl", test_stored)
    manifest = DatasetManifest(
        user_id=user_id,
        sha256=sha,
        test_sha256=sha256_bytes(test_body),
        train_count=len(train),
        test_count=len(test),
        example_counts=dict(sorted(Counter(e.source for e in train).items())),
        trigger=trigger,
        lineage=lineage_ranges,
    )
    store.write_bytes(f"{base}.manifest.json", manifest.model_dump_json(indent=2).encode())
    store.write_bytes(latest_split_file(user_id), stored)
    return DatasetRef(
        uri=uri,
        sha256=sha,
        example_counts=manifest.example_counts,
        test_uri=test_uri,
        test_sha256=manifest.test_sha256,
        test_count=len(test),
    )


def read_examples(store: ArtifactStore, uri: str) -> list[TrainingExample]:
    return from_jsonl(store.read_bytes(store.relative_from_uri(uri)))


def write_global(store: ArtifactStore, examples: list[TrainingExample]) -> str:
    """Add examples to the global pool; content-addressed, so a retry writes the same file."""
    body = to_jsonl(examples)
    return store.write_personal(f"{TRAINING_DIR}/global/{sha256_bytes(body)}.jsonl", body, None)  # several users'


def read_global(store: ArtifactStore) -> list[TrainingExample]:
    out: list[TrainingExample] = []
    for rel in store.list(f"{TRAINING_DIR}/global"):
        if rel.endswith(".jsonl"):
            out.extend(from_jsonl(store.read_bytes(rel)))
    return dedupe(out)
