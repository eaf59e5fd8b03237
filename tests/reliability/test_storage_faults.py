"""Storage faults: a full disk while an adapter is written, truncated and corrupted files, deleted active files.

Each gives a clear StorageError, the previous good version stays active, and
the audit log stays whole (every line parses). The full disk is a real one:
a 4 MiB tmpfs mounted for the test (root, as on the CI machines).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from core.errors import StorageError
from tests.support.adapters import manifest
from trainer.registry import ADAPTER_FILES, AdapterRegistry, verify_adapter_dir

pytestmark = pytest.mark.unit


def _adapter(path: Path, size: int) -> Path:
    """A stand-in adapter directory of about `size` bytes (the registry copies files; it does not load them)."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (path / "adapter_model.safetensors").write_bytes(os.urandom(size))
    return path


def _audit_is_whole(registry: AdapterRegistry) -> list[dict]:
    lines = (registry.root / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]  # raises on a torn line


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    """Write until the disk is full; return the filler file."""
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_full_disk_while_an_adapter_is_written_fails_clearly_and_keeps_the_active_version(small_disk, tmp_path, figures):
    registry = AdapterRegistry(small_disk / "store")
    v1 = registry.register("ann", _adapter(tmp_path / "a1", 200_000), manifest(request_id="r1"))
    registry.activate("ann", v1.version, reason="gate passed")
    filler = _fill(small_disk)
    os.truncate(filler, filler.stat().st_size - 300_000)  # room for the logs, not for a 1 MB adapter
    with pytest.raises(StorageError, match="No space left"):
        registry.register("ann", _adapter(tmp_path / "a2", 1_000_000), manifest(request_id="r2"))
    assert registry.active("ann") == 1 and [i.version for i in registry.versions("ann")] == [1]
    assert not [p.name for p in registry.user_dir("ann").iterdir() if p.name.startswith(".staging")], (
        "no half-written version left"
    )
    registry.verify("ann", 1)

    # The disk full to the last byte: an audit record is refused whole, never torn.
    _fill(small_disk)
    with pytest.raises(StorageError, match="No space left"):
        for n in range(200):
            registry.audit("note", "ann", detail="x" * 300, n=n)
    events = [r["event"] for r in _audit_is_whole(registry)]
    assert events[:2] == ["registered", "promoted"]
    filler.unlink()
    registry.audit("note", "ann", detail="after the disk was freed")
    assert _audit_is_whole(registry)[-1]["detail"] == "after the disk was freed"
    figures(
        "Faults",
        "Disk full (4 MiB tmpfs) while an adapter is written, then full to the last byte",
        "a 1 MB adapter with 300 kB free; audit records on a full disk",
        lost=0,
        duplicated=0,
        result="StorageError 'No space left on device', no half-written version, v1 still active and verifying; "
        "the audit record that did not fit was cut back off (no torn line), the log parses",
    )


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_a_damaged_candidate_is_refused_and_the_previous_version_stays_active(tmp_path, damage, figures):
    registry = AdapterRegistry(tmp_path / "store")
    registry.activate("bo", registry.register("bo", _adapter(tmp_path / "a1", 5_000), manifest()).version, reason="gate passed")
    v2 = registry.register("bo", _adapter(tmp_path / "a2", 5_000), manifest())
    weights = v2.path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    with pytest.raises(StorageError, match="sha256 mismatch"):
        registry.activate("bo", v2.version, reason="gate passed")
    with pytest.raises(StorageError, match="sha256 mismatch"):
        verify_adapter_dir(v2.path)  # what every loader calls first
    assert registry.active("bo") == 1
    assert [r["event"] for r in _audit_is_whole(registry)] == ["registered", "promoted", "registered"]
    figures(
        "Faults",
        f"Candidate adapter file {damage}",
        f"adapter_model.safetensors {damage} before promotion",
        lost=0,
        duplicated=0,
        result="promotion and loading refused (sha256 mismatch); v1 stays active; audit log parses",
    )


def test_deleted_active_files_give_a_clear_error_and_a_rollback_restores_the_previous_good_version(tmp_path, figures):
    registry = AdapterRegistry(tmp_path / "store")
    for n in (1, 2):
        registry.activate(
            "cy", registry.register("cy", _adapter(tmp_path / f"a{n}", 5_000), manifest()).version, reason="gate passed"
        )
    for name in ADAPTER_FILES:
        (registry.version_dir("cy", 2) / name).unlink()
    with pytest.raises(StorageError, match="adapter_config.json is missing"):
        registry.verify("cy", 2)
    with pytest.raises(StorageError, match="is missing"):
        verify_adapter_dir(registry.version_dir("cy", 2))
    assert registry.rollback("cy", reason="v2's files are gone") == (1, 2)
    assert registry.active("cy") == 1
    registry.verify("cy", 1)
    shutil.rmtree(registry.version_dir("cy", 1))
    with pytest.raises(StorageError, match="no version 1"):
        registry.verify("cy", 1)
    assert [r["event"] for r in _audit_is_whole(registry)][-2:] == ["rolled_back_from", "rolled_back"]
    figures(
        "Faults",
        "Active version's files deleted",
        "both adapter files of the active v2 removed",
        lost=0,
        duplicated=0,
        result="verify and load fail naming the missing file; a rollback makes v1 (verified) active; audit log parses",
    )
