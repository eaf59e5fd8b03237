"""The adapter registry: versions, atomic pointer, integrity, archive, audit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from adaptloop.errors import RollbackError, StorageError
from trainer.registry import AdapterRegistry

pytestmark = pytest.mark.unit


def _adapter(tmp_path, name="a", payload=b"weights"):
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (d / "adapter_model.safetensors").write_bytes(payload)
    return d


def test_versions_number_up_and_carry_a_manifest_with_hashes(tmp_path):
    reg = AdapterRegistry(tmp_path / "store", max_versions=5)
    v1 = reg.register("alice", _adapter(tmp_path, "a"), {"request_id": "r1", "metrics": {"loss": 1.0}})
    v2 = reg.register("alice", _adapter(tmp_path, "b", b"other"), {"request_id": "r2"})
    assert (v1.version, v2.version) == (1, 2)
    assert set(v1.manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert reg.active("alice") is None, "registered versions are candidates"
    assert reg.find_by_request("alice", "r2").version == 2 and reg.find_by_request("alice", "nope") is None
    assert (tmp_path / "store/models/adapters/users/alice/adapter_history.json").is_file()


def test_activate_is_atomic_and_audited(tmp_path):
    reg = AdapterRegistry(tmp_path / "store")
    reg.register("bob", _adapter(tmp_path), {})
    assert reg.activate("bob", 1, reason="test") is None
    assert reg.active("bob") == 1
    index = json.loads((reg.root / "adapters_index.json").read_text())
    assert index["bob"]["active"] == 1
    events = [e["event"] for e in reg.audit_log()]
    assert events == ["registered", "promoted"]
    assert not list((reg.root / "users/bob").glob(".tmp-*"))


def test_tampered_adapter_is_refused_and_never_activated(tmp_path):
    reg = AdapterRegistry(tmp_path / "store")
    reg.register("carol", _adapter(tmp_path, "a"), {})
    reg.activate("carol", 1, reason="good")
    reg.register("carol", _adapter(tmp_path, "b", b"v2"), {})
    (reg.version_dir("carol", 2) / "adapter_model.safetensors").write_bytes(b"evil")
    with pytest.raises(StorageError, match="sha256 mismatch"):
        reg.activate("carol", 2, reason="should fail")
    assert reg.active("carol") == 1
    (reg.version_dir("carol", 1) / "adapter_config.json").unlink()
    with pytest.raises(StorageError, match="missing"):
        reg.verify("carol", 1)


def test_old_versions_are_archived_but_never_the_active_one(tmp_path):
    reg = AdapterRegistry(tmp_path / "store", max_versions=2)
    for n in range(4):
        reg.register("dan", _adapter(tmp_path, f"a{n}", bytes([n])), {})
    reg.activate("dan", 1, reason="pin the oldest")
    assert [i.version for i in reg.versions("dan")] == [1, 4]
    assert sorted(p.name for p in (reg.root / "archive/dan").iterdir()) == ["v2", "v3"]
    assert reg.register("dan", _adapter(tmp_path, "a9", b"9"), {}).version == 5, "numbers are never reused"


def test_hostile_user_ids_cannot_leave_the_registry(tmp_path):
    reg = AdapterRegistry(tmp_path / "store")
    for bad in ["../x", "..", "a/b", "", "x" * 200]:
        with pytest.raises(ValueError):
            reg.user_dir(bad)


def test_a_crash_between_writing_a_version_and_swapping_the_pointer(tmp_path):
    """Kill a process right after register() (before activate): the old version stays active, all parses."""
    store = tmp_path / "store"
    reg = AdapterRegistry(store)
    reg.register("eve", _adapter(tmp_path, "a"), {})
    reg.activate("eve", 1, reason="first")
    new = _adapter(tmp_path, "b", b"new")
    script = f"""
import os, signal
from trainer.registry import AdapterRegistry
reg = AdapterRegistry({str(store)!r})
reg.register("eve", __import__("pathlib").Path({str(new)!r}), {{}})
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
    reg.register("fin", _adapter(tmp_path, "a"), {"trigger": "threshold", "metrics": {"final_loss": 0.1, "facts_learned": 0.8}})
    reg.register("fin", _adapter(tmp_path, "b", b"2"), {"trigger": "on-demand", "metrics": {"final_loss": 0.2}})
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
        reg.register(user, _adapter(tmp_path, f"{user}{n}", f"w{n}".encode()), {"request_id": f"r{n}"})
        reg.activate(user, n, reason="passed the validation gate")
    return reg


def test_rollback_goes_to_the_previous_good_version_and_is_logged(tmp_path):
    reg = _three_promoted(tmp_path)
    reg.register("rol", _adapter(tmp_path, "rol4", b"w4"), {"request_id": "r4"})
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
    reg.register("solo", _adapter(tmp_path, "s1"), {"request_id": "r1"})
    before = (reg.history("solo"), reg.audit_log())
    with pytest.raises(RollbackError, match="no active adapter"):
        reg.rollback("solo", "no active version yet")
    assert (reg.active("solo"), reg.history("solo"), reg.audit_log()) == (None, *before), "nothing changed"
    reg.activate("solo", 1, reason="first")
    assert reg.rollback("solo", "v1 misbehaves", command_id="c9") == (None, 1)
    assert reg.active("solo") is None, "the base model answers again"
    assert [(e["version"], e["status"]) for e in reg.history("solo")][-2:] == [(1, "rolled_back_from"), (None, "base_model")]
    assert reg.rollback_log("solo")[-1] | {"at": None} == {"user_id": "solo", "from_version": 1, "to_version": None,
        "reason": "v1 misbehaves", "requested_by": "cli", "command_id": "c9", "at": None}  # fmt: skip
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
