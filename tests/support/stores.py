"""A storage root seeded with what adaptloop keeps about a user: datasets, versions, logs, test cases."""

from __future__ import annotations

from pathlib import Path

from core.storage import ArtifactStore
from schemas.training import OffsetRange, TrainingExample
from streams.dataset import write_dataset
from tests.support.adapters import fake_adapter, manifest
from trainer.registry import AdapterRegistry


def user_example(n: int, user: str) -> TrainingExample:
    return TrainingExample(
        prompt=f"{user} question {n}?", response=f"{user} answer {n}.", source="correction", event_id=f"{user}-{n}"
    )


def seed_user(tmp_path: Path, user: str, versions: int, max_versions: int = 2, sealed: bool = False) -> Path:
    """`versions` datasets and adapter versions of `user` (beyond `max_versions` archived), a rollback, test cases; the root.

    `sealed`: encryption at rest on (`sealed_store`)."""
    root = tmp_path / "store"
    store = sealed_store(tmp_path) if sealed else ArtifactStore(str(root))
    registry = AdapterRegistry(root, max_versions=max_versions, sealer=store.sealer)
    for v in range(1, versions + 1):
        lineage = [OffsetRange(topic="interactions.feedback", partition=0, first_offset=10 * v, last_offset=10 * v + 4)]
        write_dataset(
            store, user, [user_example(v, user)], [user_example(100 + v, user)], trigger="threshold", lineage_ranges=lineage
        )
        lineage_json = [r.model_dump() for r in lineage]
        registry.register(
            user,
            fake_adapter(tmp_path, f"{user}{v}", f"{user}-w{v}".encode()),
            manifest(request_id=f"{user}-r{v}", trigger="threshold", metrics={"user_score": 0.9}, lineage=lineage_json),
        )
        registry.activate(user, v, reason="passed the validation gate")
        registry.log_validation(user, v, {"passed": True, "user_score": 0.9})
    registry.rollback(user, "complaints", requested_by="test")
    store.write_personal(f"data/adapter_tests/user_{user}.jsonl", (user_example(7, user).model_dump_json() + "\n").encode(), user)
    return root


def sealed_store(tmp_path: Path) -> ArtifactStore:
    """A storage root under `tmp_path/store` with encryption at rest on, its keyring beside it (outside the root)."""
    from core.encryption import open_store

    return open_store(str(tmp_path / "store"), sealed_settings(tmp_path))


def sealed_settings(tmp_path: Path):
    """`storage.encryption` on, with a keyring at `tmp_path/keys/keyring.json` (created once)."""
    from core.encryption import Keyring
    from core.settings import EncryptionSettings

    keyring = tmp_path / "keys" / "keyring.json"
    if not keyring.exists():
        Keyring.create(keyring)
    return EncryptionSettings(enabled=True, keyring=keyring)


def has_plain_magic(data: bytes) -> bool:
    """True when `data` starts like JSON, JSON lines or safetensors (an 8-byte header length, then '{')."""
    stripped = data.lstrip()
    return stripped[:1] in (b"{", b"[") or data[8:9] == b"{"
