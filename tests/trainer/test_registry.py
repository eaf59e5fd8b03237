"""The adapter registry: versions, atomic pointer, integrity, archive, audit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from core.errors import RollbackError, StorageError, VersionNotFound
from schemas.manifest import MANIFEST_VERSION
from tests.support.adapters import fake_adapter, manifest
from trainer.registry import AdapterRegistry

pytestmark = pytest.mark.unit


def test_versions_number_up_and_carry_a_manifest_with_hashes(tmp_path):
    reg = AdapterRegistry(tmp_path / "store", max_versions=5)
    v1 = reg.register("alice", fake_adapter(tmp_path, "a"), manifest(request_id="r1", metrics={"final_loss": 1.0}))
    v2 = reg.register("alice", fake_adapter(tmp_path, "b", b"other"), manifest(request_id="r2"))
    assert (v1.version, v2.version) == (1, 2)
    assert set(v1.manifest.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert reg.info("alice", 1).manifest == v1.manifest and v1.manifest.manifest_version == MANIFEST_VERSION
    assert reg.active("alice") is None, "registered versions are candidates"
    assert reg.find_by_request("alice", "r2").version == 2 and reg.find_by_request("alice", "nope") is None
    assert (tmp_path / "store/models/adapters/users/alice/adapter_history.json").is_file()


def test_activate_is_atomic_and_audited(tmp_path):
    reg = AdapterRegistry(tmp_path / "store")
    reg.register("bob", fake_adapter(tmp_path), manifest())
    assert reg.activate("bob", 1, reason="test") is None
    assert reg.active("bob") == 1
    index = json.loads((reg.root / "adapters_index.json").read_text())
    assert index["bob"]["active"] == 1
    events = [e["event"] for e in reg.audit_log()]
    assert events == ["registered", "promoted"]
    assert not list((reg.root / "users/bob").glob(".tmp-*"))


def test_tampered_adapter_is_refused_and_never_activated(tmp_path):
    reg = AdapterRegistry(tmp_path / "store")
    reg.register("carol", fake_adapter(tmp_path, "a"), manifest())
    reg.activate("carol", 1, reason="good")
    reg.register("carol", fake_adapter(tmp_path, "b", b"v2"), manifest())
    (reg.version_dir("carol", 2) / "adapter_model.safetensors").write_bytes(b"evil")
    with pytest.raises(StorageError, match="sha256 mismatch"):
        reg.activate("carol", 2, reason="should fail")
    assert reg.active("carol") == 1
    (reg.version_dir("carol", 1) / "adapter_config.json").unlink()
    with pytest.raises(StorageError, match="missing"):
        reg.verify("carol", 1)
    with pytest.raises(VersionNotFound, match="carol has no version 7"):
        reg.info("carol", 7)


def test_manifests_written_before_they_were_typed_still_load(tmp_path):
    """A version 1 manifest (no manifest_version, plain dicts) reads into the typed model."""
    reg = AdapterRegistry(tmp_path / "store")
    info = reg.register("old", fake_adapter(tmp_path), manifest(request_id="r1"))
    legacy = {
        "base_model": "embedded:smollm2-135m-instruct",
        "base_model_sha256": "ab" * 32,
        "request_id": "r1",
        "trigger": "threshold",
        "dataset": {"uri": "file:///d.jsonl", "sha256": "cd" * 32, "train_count": 9, "replay_thinned": 0, "anchor_count": 16},
        "held_out": [{"prompt": "Who am I?", "expected": "You are Ana."}],
        "lineage": [],
        "hyperparameters": {"epochs": 8, "r": 16, "alpha": 32, "target_modules": ["q_proj"], "top_layer_share": 0.5},
        "metrics": {"train_seconds": 49.1, "steps": 32, "tokens": 4000, "final_loss": 0.05, "user_score": 0.9, "core_score": 0.8},
        "loss_curve": [1.0, 0.5],
        "resumed_from_step": 0,
        "started_from_version": None,
        "early_stopping": {"stopped_after_epoch": 3, "stopped_by": "early stopping", "checks": [], "update_scaled": 0.5},
        "trained_at": "2026-11-26T10:00:00+00:00",
        "facts": [{"prompt": "Who am I?", "expected": "You are Ana.", "learned": True}],
        "validation": {
            "passed": True,
            "reasons": [],
            "reference_version": None,
            "suites": {"core": {"score": 0.8, "passed": True, "threshold": 0.75, "reference_score": 0.8, "cases": 44}},
        },
        "user_id": "old",
        "version": 1,
        "files": info.manifest.files,
        "registered_at": "2026-11-26T10:01:00+00:00",
    }
    (info.path / "manifest.json").write_text(json.dumps(legacy))
    loaded = reg.verify("old", 1).manifest
    assert (
        loaded.manifest_version == 1
        and loaded.metrics.user_score == 0.9
        and loaded.hyperparameters.lora_shape() == (16, 32, 0.5, ("q_proj",))
    )
    assert [f.prompt for f in loaded.learned_facts()] == ["Who am I?"] and loaded.validation.suites["core"].cases == 44
    assert loaded.loss_curves == {} and loaded.early_stopping.update_scaled == 0.5
    (info.path / "manifest.json").write_text("{not json")
    with pytest.raises(StorageError, match="corrupt"):
        reg.info("old", 1)


def test_old_versions_are_archived_but_never_the_active_one(tmp_path):
    reg = AdapterRegistry(tmp_path / "store", max_versions=2)
    for n in range(4):
        reg.register("dan", fake_adapter(tmp_path, f"a{n}", bytes([n])), manifest())
    reg.activate("dan", 1, reason="pin the oldest")
    assert [i.version for i in reg.versions("dan")] == [1, 4]
    assert sorted(p.name for p in (reg.root / "archive/dan").iterdir()) == ["v2", "v3"]
    assert reg.register("dan", fake_adapter(tmp_path, "a9", b"9"), manifest()).version == 5, "numbers are never reused"


def test_hostile_user_ids_cannot_leave_the_registry(tmp_path):
    reg = AdapterRegistry(tmp_path / "store")
    for bad in ["../x", "..", "a/b", "", "x" * 200]:
        with pytest.raises(ValueError):
            reg.user_dir(bad)


def test_a_crash_between_writing_a_version_and_swapping_the_pointer(tmp_path):
    """Kill a process right after register() (before activate): the old version stays active, all parses."""
    store = tmp_path / "store"
    reg = AdapterRegistry(store)
    reg.register("eve", fake_adapter(tmp_path, "a"), manifest())
    reg.activate("eve", 1, reason="first")
    new = fake_adapter(tmp_path, "b", b"new")
    script = f"""
import os, signal
from schemas.manifest import AdapterManifest
from trainer.registry import AdapterRegistry
reg = AdapterRegistry({str(store)!r})
reg.register("eve", __import__("pathlib").Path({str(new)!r}), AdapterManifest())
os.kill(os.getpid(), signal.SIGKILL)  # dies before activate()
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd())
    assert proc.returncode == -9
    assert reg.active("eve") == 1
    assert [i.version for i in reg.versions("eve")] == [1, 2]
    reg.verify("eve", 2)
    assert all(isinstance(e, dict) for e in reg.audit_log())
    assert not list((store / "models/adapters/users/eve").glob(".staging-*"))


def test_status_and_history_commands(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from adaptloop.cli import cli

    monkeypatch.setenv("ADAPTLOOP_STORAGE_ROOT", str(tmp_path / "store"))
    reg = AdapterRegistry(tmp_path / "store")
    reg.register(
        "fin", fake_adapter(tmp_path, "a"), manifest(trigger="threshold", metrics={"final_loss": 0.1, "facts_learned": 0.8})
    )
    reg.register("fin", fake_adapter(tmp_path, "b", b"2"), manifest(trigger="on-demand", metrics={"final_loss": 0.2}))
    reg.activate("fin", 1, reason="test")
    status = CliRunner().invoke(cli, ["status", "fin"])
    assert status.exit_code == 0 and "active version 1" in status.output and "facts_learned" in status.output
    history = CliRunner().invoke(cli, ["history", "fin"])
    assert history.exit_code == 0
    assert "* v1" in history.output and "  v2" in history.output and "trigger=on-demand" in history.output
    bad = CliRunner().invoke(cli, ["status", "../etc"])
    assert bad.exit_code != 0 and "user_id" in bad.output


def _three_promoted(tmp_path, user="rol"):
    reg = AdapterRegistry(tmp_path / "store", max_versions=5)
    for n in (1, 2, 3):
        reg.register(user, fake_adapter(tmp_path, f"{user}{n}", f"w{n}".encode()), manifest(request_id=f"r{n}"))
        reg.activate(user, n, reason="passed the validation gate")
    return reg


def test_rollback_goes_to_the_previous_good_version_and_is_logged(tmp_path):
    reg = _three_promoted(tmp_path)
    reg.register("rol", fake_adapter(tmp_path, "rol4", b"w4"), manifest(request_id="r4"))
    reg.mark("rol", 4, "rejected", reasons=["core suite regressed"])
    assert reg.rollback("rol", "users complain", command_id="c1") == (2, 3)
    assert reg.active("rol") == 2
    # Rolled back from v3: a second rollback skips it and goes further back, never forward.
    assert reg.rollback("rol", "still bad") == (1, 2)
    log = reg.rollback_log("rol")
    assert [(r["from_version"], r["to_version"], r["reason"]) for r in log] == [(3, 2, "users complain"), (2, 1, "still bad")]
    assert log[0]["command_id"] == "c1"
    assert [e["event"] for e in reg.audit_log() if e["event"] == "rolled_back"] == ["rolled_back", "rolled_back"]
    assert json.loads((tmp_path / "store/models/adapters/adapters_index.json").read_text())["rol"]["active"] == 1


def test_rollback_to_a_named_version(tmp_path):
    reg = _three_promoted(tmp_path)
    assert reg.rollback("rol", "pin v1", to_version=1) == (1, 3)
    assert reg.rollback("rol", "back to v3", to_version=3) == (3, 1), "a named version may be newer"
    with pytest.raises(RollbackError, match="no kept version 9"):
        reg.rollback("rol", "nope", to_version=9)
    with pytest.raises(RollbackError, match="already active"):
        reg.rollback("rol", "nope", to_version=3)


def test_rollback_past_the_first_version_restores_the_base_model(tmp_path):
    reg = AdapterRegistry(tmp_path / "store")
    reg.register("solo", fake_adapter(tmp_path, "s1"), manifest(request_id="r1"))
    before = (reg.history("solo"), reg.audit_log())
    with pytest.raises(RollbackError, match="no active adapter"):
        reg.rollback("solo", "no active version yet")
    assert (reg.active("solo"), reg.history("solo"), reg.audit_log()) == (None, *before), "nothing changed"
    reg.activate("solo", 1, reason="first")
    assert reg.rollback("solo", "v1 misbehaves", command_id="c9") == (None, 1)
    assert reg.active("solo") is None, "the base model answers again"
    assert [(e["version"], e["status"]) for e in reg.history("solo")][-2:] == [(1, "rolled_back_from"), (None, "base_model")]
    assert reg.rollback_log("solo")[-1] | {"at": None} == {
        "user_id": "solo",
        "from_version": 1,
        "to_version": None,
        "reason": "v1 misbehaves",
        "requested_by": "cli",
        "command_id": "c9",
        "at": None,
    }
    assert json.loads((tmp_path / "store/models/adapters/adapters_index.json").read_text())["solo"]["active"] is None
    with pytest.raises(RollbackError, match="no active adapter"):
        reg.rollback("solo", "again")
    assert reg.previous_good("solo") is None, "v1 was rolled back from: never a target by default"
    assert reg.rollback("solo", "v1 was fine after all", to_version=1) == (1, None)
    assert reg.active("solo") == 1


def test_rollback_refuses_a_tampered_target(tmp_path):
    reg = _three_promoted(tmp_path)
    (reg.version_dir("rol", 2) / "adapter_model.safetensors").write_bytes(b"evil")
    with pytest.raises(RollbackError, match="sha256 mismatch"):
        reg.rollback("rol", "try")
    assert reg.active("rol") == 3


def test_a_forget_rewrites_the_logs_without_losing_a_line_another_process_appends_meanwhile(tmp_path):
    """Appends take a shared lock and check they still write to the live file; a forget's rewrite takes it exclusively."""
    import threading

    registry = AdapterRegistry(tmp_path / "store")
    stop, appended = threading.Event(), []

    def append() -> None:
        while not stop.is_set():
            registry.audit("noted", "ben", n=len(appended))
            appended.append(len(appended))

    writer = threading.Thread(target=append)
    writer.start()
    for round_ in range(30):
        registry.audit("noted", "zed", n=round_)
        registry.forget("zed", "0" * 32, f"2026-12-01T00:00:{round_:02d}+00:00", "test")
    stop.set()
    writer.join()
    log = registry.audit_log()
    assert [r["n"] for r in log if r.get("user_id") == "ben"] == appended and len(appended) > 30
    assert not any(r.get("user_id") == "zed" for r in log)
    assert len([r for r in log if r.get("event") == "forgotten"]) == 30, "one tombstone per forget that removed lines"


def test_an_encrypted_registry_seals_both_files_and_refuses_any_change(tmp_path):
    from core.encryption import MAGIC
    from core.storage import sha256_bytes
    from schemas.manifest import ADAPTER_WEIGHTS
    from tests.support.stores import has_plain_magic, sealed_store
    from trainer.registry import ADAPTER_FILES, MANIFEST

    reg = AdapterRegistry(tmp_path / "store", sealer=sealed_store(tmp_path).sealer)
    source = fake_adapter(tmp_path, "a", b"weights-bytes")
    info = reg.register("ana", source, manifest())
    stored = {name: (info.path / name).read_bytes() for name in ADAPTER_FILES}
    assert all(data.startswith(MAGIC) and not has_plain_magic(data) for data in stored.values())
    assert info.manifest.weights_sha256 == sha256_bytes(b"weights-bytes"), "identity: the plaintext, as without encryption"
    assert info.manifest.sealed_files == {name: sha256_bytes(data) for name, data in stored.items()}
    assert reg.files(reg.verify("ana", 1)) == {name: (source / name).read_bytes() for name in ADAPTER_FILES}
    opened = reg.plain_dir(info.path, tmp_path / "opened")
    assert (opened / ADAPTER_WEIGHTS).read_bytes() == b"weights-bytes"
    with pytest.raises(StorageError, match="is encrypted: set storage.encryption"):
        AdapterRegistry(tmp_path / "store").files(info)

    # Another version's sealed weights (they open under ana's key) put behind v1: their sealed digest is not v1's.
    weights = info.path / ADAPTER_WEIGHTS
    other = reg.register("ana", fake_adapter(tmp_path, "b", b"other-weights"), manifest())
    weights.write_bytes((other.path / ADAPTER_WEIGHTS).read_bytes())
    with pytest.raises(StorageError, match="sha256 mismatch"):
        reg.files(info)
    with pytest.raises(StorageError, match="sha256 mismatch"):
        reg.plain_dir(info.path, tmp_path / "opened-again")

    # A flipped byte on disk: the sealed hash refuses it (verify, no keys), AES-GCM when loading, also with the
    # manifest forged to match.
    flipped = bytearray(stored[ADAPTER_WEIGHTS])
    flipped[-1] ^= 1
    weights.write_bytes(bytes(flipped))
    with pytest.raises(StorageError, match="sha256 mismatch"):
        reg.verify("ana", 1)
    with pytest.raises(StorageError, match="integrity check"):
        reg.files(info)
    forged = info.manifest.model_copy(
        update={"sealed_files": {**info.manifest.sealed_files, ADAPTER_WEIGHTS: sha256_bytes(bytes(flipped))}}
    )
    (info.path / MANIFEST).write_bytes(forged.to_json())
    with pytest.raises(StorageError, match="integrity check"):
        reg.files(reg.verify("ana", 1))
