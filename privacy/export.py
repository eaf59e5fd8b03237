"""Everything adaptloop holds about one user, as files a person or a program can read (GDPR art. 15 and 20).

    cfg = ExportConfig.from_settings(settings)
    held = read_worker_holdings(cfg, "ana")               # the worker's state and pending examples (Kafka)
    index = export_user(cfg, "ana", Path("out"), held)

The export directory:

    README.md                  what each part is, in words
    export.json                the same as data (`ExportIndex`): every file, what it is, how many records
    datasets/                  every dataset the user's versions were trained on (+ held-out splits, manifests)
    user_tests.jsonl           the user's explicit test cases, when there are any
    pending_examples.jsonl     examples gathered since the last training request (from the worker)
    worker_state.json          the worker's counters for the user: gaps, outcomes, consent (from the worker)
    adapters/v<N>/             every kept version: weights, config, manifest (metrics, lineage, sha256s)
    adapters/archive/v<N>/     versions beyond max_adapter_versions
    history.json, validation_results.jsonl, rollbacks.jsonl, audit.jsonl
    lineage.json               per version: the topic/partition/offset ranges its data came from

Reads only; writes nothing under the storage root.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from core.encryption import open_store
from core.errors import AdaptloopError
from core.kafka.client import ClientConfig
from core.kafka.io import read_since
from core.settings import EncryptionSettings, Settings, changelog_topic
from core.storage import ArtifactStore, atomic_write
from schemas.common import check_user_id
from schemas.dataset import from_jsonl, to_jsonl
from schemas.training import TrainingExample
from streams.dataset import user_versions_dir
from trainer.job import user_tests_file
from trainer.registry import AdapterRegistry, adapter_files, read_manifest


@dataclass(frozen=True)
class ExportConfig:
    storage_root: str
    max_versions: int
    user_tests_dir: str
    client: ClientConfig
    users_changelog: str  # the worker's tables, where its state and pending examples live
    examples_changelog: str
    encryption: EncryptionSettings = EncryptionSettings()  # storage.encryption: seal personal files

    @classmethod
    def from_settings(cls, settings: Settings) -> ExportConfig:
        app_id = settings.streams.app_id
        return cls(
            storage_root=settings.storage_root,
            encryption=settings.storage.encryption,
            max_versions=settings.max_adapter_versions,
            user_tests_dir=settings.validation.user_tests_dir,
            client=ClientConfig.from_settings(settings),
            users_changelog=changelog_topic(app_id, "users"),
            examples_changelog=changelog_topic(app_id, "examples"),
        )


class ExportPart(BaseModel):
    path: str
    what: str
    records: int | None = None


class ExportIndex(BaseModel):
    user_id: str
    exported_at: str
    parts: list[ExportPart]
    not_included: list[str] = []


@dataclass
class WorkerHoldings:
    """What the worker keeps about a user in its tables (read from their changelog topics)."""

    state: dict[str, Any] | None = None
    pending: list[TrainingExample] = field(default_factory=list)


def read_worker_holdings(cfg: ExportConfig, user_id: str, timeout: float = 60.0) -> WorkerHoldings:
    """The user's worker state and pending examples: the latest value of each of their keys in the changelogs."""
    key, prefix = user_id.encode(), user_id.encode() + b"\x00"
    held = WorkerHoldings()
    examples: dict[bytes, bytes | None] = {}
    # No changelog yet: no worker ever ran on these topics, so it holds nothing.
    for record in read_since(cfg.client, [cfg.users_changelog, cfg.examples_changelog], 0, timeout, missing_ok=True):
        if record.topic == cfg.users_changelog and record.key == key:
            held.state = None if record.value is None else json.loads(record.value)
        elif record.topic == cfg.examples_changelog and record.key is not None and record.key.startswith(prefix):
            examples[record.key] = record.value
    held.pending = [TrainingExample.model_validate_json(v) for k, v in sorted(examples.items()) if v is not None]
    return held


class _Writer:
    """Copies and writes into the export directory, noting each part for the index."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.parts: list[ExportPart] = []

    def write(self, relative: str, data: bytes, what: str, records: int | None = None) -> None:
        atomic_write(self.out / relative, data, mode=0o600)
        self.parts.append(ExportPart(path=relative, what=what, records=records))

    def json(self, relative: str, value: Any, what: str, records: int | None = None) -> None:
        self.write(relative, json.dumps(value, indent=2, sort_keys=True, default=str).encode() + b"\n", what, records)

    def lines(self, relative: str, rows: list[dict], what: str) -> None:
        self.write(relative, b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in rows), what, len(rows))

    def tree(self, relative: str, source: Path, what: str, opened: dict[str, bytes] | None = None) -> None:
        """Copy the directory `source`; `opened`: files written as given instead (sealed at rest, opened for the user)."""
        shutil.copytree(source, self.out / relative, dirs_exist_ok=True)
        for name, data in (opened or {}).items():
            atomic_write(self.out / relative / name, data, mode=0o600)
        self.parts.append(ExportPart(path=relative + "/", what=what))


def export_user(cfg: ExportConfig, user_id: str, out: Path, held: WorkerHoldings | None) -> ExportIndex:
    """Write everything held about `user_id` into `out` (created; must be empty); return the index."""
    check_user_id(user_id)
    if out.exists() and any(out.iterdir()):
        raise AdaptloopError(f"{out} is not empty: an export goes into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    writer = _Writer(out)
    store = open_store(cfg.storage_root, cfg.encryption)
    registry = AdapterRegistry(cfg.storage_root, cfg.max_versions, store.sealer)
    _datasets(writer, store, user_id, cfg.user_tests_dir)
    _adapters(writer, registry, user_id)
    _logs(writer, registry, user_id)
    not_included = []
    if held is None:
        not_included.append("the worker's state and pending examples (not read: --no-worker-state)")
    else:
        _worker(writer, held)
    index = ExportIndex(user_id=user_id, exported_at=datetime.now(UTC).isoformat(), parts=writer.parts, not_included=not_included)
    atomic_write(out / "export.json", index.model_dump_json(indent=2).encode(), mode=0o600)
    atomic_write(out / "README.md", _readme(index).encode(), mode=0o600)
    return index


def _datasets(writer: _Writer, store: ArtifactStore, user_id: str, tests_dir: str) -> None:
    for relative in store.list(user_versions_dir(user_id)):
        name = relative.rsplit("/", 1)[1]
        data = store.read_bytes(relative)
        if name.endswith(".manifest.json"):
            writer.write(f"datasets/{name}", data, "a dataset's manifest: counts, sha256, trigger, lineage")
        else:
            what = "held-out examples (the gate's user suite)" if name.endswith(".test.jsonl") else "training examples"
            writer.write(f"datasets/{name}", data, what, len(from_jsonl(data)))
    tests = user_tests_file(tests_dir, user_id)
    if store.exists(tests):
        data = store.read_bytes(tests)
        writer.write("user_tests.jsonl", data, "explicit test cases the gate asks every version", len(from_jsonl(data)))


def _adapters(writer: _Writer, registry: AdapterRegistry, user_id: str) -> None:
    lineage: dict[str, Any] = {}
    kept = [(f"adapters/v{info.version}", info.path) for info in registry.versions(user_id)]
    archive = registry.root / "archive" / user_id
    if archive.is_dir():
        kept += [(f"adapters/archive/{p.name}", p) for p in sorted(archive.iterdir()) if p.is_dir()]
    for relative, path in kept:
        what = "an adapter version: LoRA weights (safetensors), config, manifest with metrics"
        writer.tree(relative, path, what, adapter_files(path, registry.sealer))
        manifest = read_manifest(path)
        lineage[relative.rsplit("/", 1)[1]] = manifest.model_dump(mode="json").get("lineage")
    writer.json("lineage.json", lineage, "per version: the topic, partition and offset ranges its data came from", len(lineage))


def _logs(writer: _Writer, registry: AdapterRegistry, user_id: str) -> None:
    writer.json("history.json", registry.history(user_id), "every promotion, rejection and rollback of a version")
    writer.lines("validation_results.jsonl", registry.validation_results(user_id), "every validation gate result")
    writer.lines("rollbacks.jsonl", registry.rollback_log(user_id), "every rollback")
    writer.lines("audit.jsonl", [e for e in registry.audit_log() if e.get("user_id") == user_id], "every registry event")


def _worker(writer: _Writer, held: WorkerHoldings) -> None:
    writer.write(
        "pending_examples.jsonl", to_jsonl(held.pending), "examples gathered since the last training request", len(held.pending)
    )
    writer.json("worker_state.json", held.state, "the worker's counters: gaps, outcomes, consent, the open request")


def _readme(index: ExportIndex) -> str:
    rows = "\n".join(
        f"| `{p.path}` | {p.what} | {'' if p.records is None else p.records} |" for p in sorted(index.parts, key=lambda p: p.path)
    )
    missing = "".join(f"\nNot included: {item}.\n" for item in index.not_included)
    return (
        f"# Everything adaptloop holds about `{index.user_id}`\n\nExported {index.exported_at}. "
        "`export.json` lists the same parts as data.\n\n| file | what it is | records |\n| --- | --- | --- |\n"
        f"{rows}\n{missing}"
    )
