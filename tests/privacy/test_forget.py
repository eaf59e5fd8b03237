"""`adaptloop forget`: nothing of the user left in the store, tombstones with a salted hash, the announcements sent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

from core.errors import AdaptloopError, StorageError
from core.forgotten import ForgetMarker, ForgetMarkers, UserHasher
from core.kafka.client import ClientConfig
from core.kafka.topics import TopicPlan
from core.storage import ArtifactStore
from privacy.forget import ForgetConfig, forget_user
from schemas import ForgottenRecord, LifecycleEvent
from schemas.commands import ForgetCommand
from tests.support.kafka import read_topic
from tests.support.processes import run_cli, wait_until
from tests.support.stores import seed_user
from trainer.registry import ROLLBACK_LOG, VALIDATION_LOG, AdapterRegistry

pytestmark = pytest.mark.kafka

USER = "zelda-7731"  # distinctive: its bytes appear nowhere by chance
TOMBSTONE_KEYS = {"event", "user_hash", "at", "reason"}


def _config(tmp_path, client: ClientConfig, topic_factory) -> ForgetConfig:
    return ForgetConfig(
        storage_root=str(tmp_path / "store"),
        user_tests_dir="data/adapter_tests",
        client=client,
        commands_topic=topic_factory("commands", partitions=6),  # the settings' default partitions
        lifecycle_topic=topic_factory("lifecycle", partitions=6),
        forgotten=TopicPlan(
            f"test.forgotten.{uuid.uuid4().hex[:10]}", 1, config=(("cleanup.policy", "compact"),)
        ),  # forget creates it
    )


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _held_by(root, needle: bytes) -> list[str]:
    return sorted(path for path, data in _files(root).items() if needle in data)


def _tombstones(root, name: str) -> list[dict]:
    lines = [json.loads(line) for line in (root / "models/adapters" / name).read_text().splitlines()]
    return [line for line in lines if line.get("event") == "forgotten"]


def test_forget_leaves_nothing_of_the_user_in_the_store_and_nothing_of_another_user_changes(
    tmp_path, kafka_client, topic_factory
):
    cfg = _config(tmp_path, kafka_client, topic_factory)
    root = seed_user(tmp_path, USER, versions=3)
    seed_user(tmp_path, "ben", versions=1)
    # a checkpoint of a job in flight, where the trainer keeps it: under the user's salted hash
    user_hash = UserHasher.for_store(ArtifactStore(str(root)))(USER)
    (root / "models/adapters/checkpoints" / user_hash / "req-1").mkdir(parents=True)
    (root / "models/adapters/checkpoints" / user_hash / "req-1/progress.json").write_text('{"step": 3}')
    assert len(_held_by(root, USER.encode())) >= 15, "the seed holds the user in datasets, adapters, logs, test cases"
    bens = {p: d for p, d in _files(root).items() if "ben" in p}

    result = forget_user(cfg, USER, "erasure request #1")

    assert result.user_hash == user_hash and not result.resumed
    assert _held_by(root, USER.encode()) == [], "the user's id (and so every text of theirs, which names them)"
    assert not list((root / "models/adapters/checkpoints").iterdir()), "the checkpoint"
    assert {p: d for p, d in _files(root).items() if "ben" in p} == bens, "another user's files are untouched"
    registry = AdapterRegistry(root, max_versions=2)
    assert [v.version for v in registry.versions("ben")] == [1] and registry.versions(USER) == []
    assert [r.get("user_id") for r in registry.rollback_log()] == ["ben", None]
    for name in ("audit.jsonl", VALIDATION_LOG, ROLLBACK_LOG):
        (tombstone,) = _tombstones(root, name)
        assert set(tombstone) == TOMBSTONE_KEYS and tombstone["user_hash"] == user_hash
        assert tombstone["reason"] == "erasure request #1" and tombstone["at"] == result.forgotten_at
    assert json.loads((root / "models/adapters/adapters_index.json").read_text()).keys() == {"ben"}

    (command,) = [ForgetCommand.model_validate_json(r.value) for r in read_topic(kafka_client, cfg.commands_topic)]
    assert command.user_id == USER and command.user_hash == user_hash and command.command_id == result.command_id
    (event,) = [LifecycleEvent.model_validate_json(r.value) for r in read_topic(kafka_client, cfg.lifecycle_topic)]
    assert event.type == "forgotten" and event.user_id == user_hash and USER not in event.model_dump_json()
    (record,) = [ForgottenRecord.model_validate_json(r.value) for r in read_topic(kafka_client, cfg.forgotten.name)]
    assert record.user_hash == user_hash and record.forgotten_at.isoformat() == result.forgotten_at
    assert ForgetMarkers(ArtifactStore(str(root))).read(user_hash).state == "done"

    with pytest.raises(AdaptloopError, match="reason"):
        forget_user(cfg, USER, "a\x00b")
    again = forget_user(cfg, USER, "erasure request #1")
    assert again.removed == [], "a second forget finds nothing more"
    assert all(len(_tombstones(root, n)) == 1 for n in ("audit.jsonl", VALIDATION_LOG, ROLLBACK_LOG))


def test_with_encryption_at_rest_a_forget_destroys_the_users_key_so_backups_cannot_be_opened(
    tmp_path, kafka_client, topic_factory
):
    from dataclasses import replace

    from core.encryption import open_store
    from tests.support.stores import sealed_settings

    cfg = replace(_config(tmp_path, kafka_client, topic_factory), encryption=sealed_settings(tmp_path))
    root = seed_user(tmp_path, USER, versions=2, sealed=True)
    seed_user(tmp_path, "ben", versions=1, sealed=True)
    backup = {p: d for p, d in _files(root).items() if p.endswith(".jsonl") and f"user_{USER}" in p}
    assert backup and not any(b"prompt" in d for d in backup.values()), "the datasets are sealed"

    result = forget_user(cfg, USER, "erasure request #2")

    store = open_store(str(root), cfg.encryption)
    assert f"privacy/keys/{result.user_hash}.json" in result.removed
    for path, data in backup.items():  # a copy of the root taken before the forget
        with pytest.raises(StorageError, match="data key is gone"):
            store.sealer.open(data, path)
    ben = ArtifactStore(str(root)).list("data/adapter_training/versions/user_ben")
    assert all(b"prompt" in store.read_bytes(p) for p in ben if p.endswith(".jsonl")), "ben's files still open"


def test_an_interrupted_forget_finishes_with_the_first_runs_time(tmp_path, kafka_client, topic_factory):
    """A run killed after its marker (step 1) and part of the deletions: the next run resumes, with the same time."""
    cfg = _config(tmp_path, kafka_client, topic_factory)
    root = seed_user(tmp_path, USER, versions=2)
    store = ArtifactStore(str(root))
    user_hash = UserHasher.for_store(store)(USER)
    ForgetMarkers(store).write(ForgetMarker(user_hash=user_hash, at=1_790_000_000.0, reason="first run"))
    store.remove(f"data/adapter_tests/user_{USER}.jsonl")  # as far as the killed run got

    result = forget_user(cfg, USER, "second run")

    assert result.resumed and result.forgotten_at.startswith("2026-09-21T")  # 1,790,000,000 s
    assert _held_by(root, USER.encode()) == []
    (tombstone,) = _tombstones(root, "audit.jsonl")
    assert tombstone["reason"] == "first run", "the first run's forget is the one finished"


def test_a_forget_killed_once_it_has_begun_finishes_when_run_again(tmp_path, kafka_client, topic_factory):
    import yaml

    cfg = _config(tmp_path, kafka_client, topic_factory)
    root = seed_user(tmp_path, USER, versions=3)
    config = tmp_path / "adapter_retrain.yaml"
    topics = {"commands": cfg.commands_topic, "lifecycle": cfg.lifecycle_topic, "forgotten": cfg.forgotten.name}
    config.write_text(
        yaml.safe_dump(
            {
                "storage_root": str(root),
                "topics": {k: {"name": v, "partitions": 6 if k != "forgotten" else 1} for k, v in topics.items()},
            }
        )
    )
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_client.bootstrap_servers}
    proc = subprocess.Popen(
        [sys.executable, "-m", "adaptloop.cli", "--config", str(config), "forget", USER, "--reason", "chaos"],
        env=dict(os.environ, **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    markers = root / "privacy/forgotten"
    # Killed as soon as it has begun (its marker exists): wherever it then is, the next run must finish it.
    wait_until(lambda: proc.poll() is not None or (markers.is_dir() and any(markers.iterdir())), 120, "the forget begun")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert markers.is_dir() and any(markers.iterdir()), f"the killed run had begun: {proc.stderr.read()!r}"

    done = run_cli("--config", str(config), "forget", USER, "--reason", "chaos", env=env)
    assert done.returncode == 0, done.stderr
    assert _held_by(root, USER.encode()) == []
    assert list(root.rglob("adapter_model.safetensors")) == [], "no adapter of the user"
