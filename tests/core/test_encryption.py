"""Encryption at rest: sealed files, the keyring, rotation and retirement, crypto-shredding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from core.encryption import MAGIC, Keyring, Sealer, key_file, key_files, keyring_summary, retire, rotate
from core.errors import ConfigError, StorageError
from core.settings import load_settings
from core.storage import ArtifactStore
from tests.support.processes import wait_until
from tests.support.stores import has_plain_magic, sealed_store

pytestmark = pytest.mark.unit


def test_a_personal_file_is_sealed_on_disk_and_read_back_as_written(tmp_path):
    store = sealed_store(tmp_path)
    body = b'{"prompt": "my card", "response": "is 4111"}\n'
    store.write_personal("training/ana/x.jsonl", body, "ana")
    raw = (tmp_path / "store/training/ana/x.jsonl").read_bytes()
    assert raw.startswith(MAGIC) and not has_plain_magic(raw) and b"4111" not in raw
    assert store.read_bytes("training/ana/x.jsonl") == body
    assert store.write_personal("a/y.jsonl", body, "ana") and store.read_bytes("a/y.jsonl") == body
    assert (tmp_path / "store/a/y.jsonl").read_bytes() != raw, "a fresh file key and nonce per file"
    # Only the key file names the owner, by its salted hash; the keyring sits outside the root.
    assert key_files(ArtifactStore(str(tmp_path / "store"))) == [key_file(store.sealer.hasher("ana"))]


def test_a_flipped_byte_anywhere_is_refused(tmp_path):
    store = sealed_store(tmp_path)
    store.write_personal("f.jsonl", b"x" * 100, "ana")
    path = tmp_path / "store/f.jsonl"
    raw = path.read_bytes()
    for at in range(len(MAGIC), len(raw), 7):  # the owner, the wrapped file key, the nonces, the content, the tag
        changed = bytearray(raw)
        changed[at] ^= 0x01
        path.write_bytes(bytes(changed))
        with pytest.raises(StorageError, match="integrity check|data key is gone|not sealed"):
            store.read_bytes("f.jsonl")
    path.write_bytes(raw)
    assert store.read_bytes("f.jsonl") == b"x" * 100


def test_a_sealed_file_without_the_keys_is_a_clear_error(tmp_path):
    sealed_store(tmp_path).write_personal("f.jsonl", b"data", "ana")
    with pytest.raises(StorageError, match="is encrypted: set storage.encryption"):
        ArtifactStore(str(tmp_path / "store")).read_bytes("f.jsonl")
    other = Sealer(ArtifactStore(str(tmp_path / "store")), Keyring.create(tmp_path / "other.json"))
    with pytest.raises(StorageError, match="not in the keyring"):
        other.open((tmp_path / "store/f.jsonl").read_bytes())


def test_the_keyring_is_private_outside_the_root_and_never_overwritten(tmp_path, monkeypatch):
    path = tmp_path / "keyring.json"
    keyring = Keyring.create(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ConfigError, match="exists already"):
        Keyring.create(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others; chmod 600"):
        Keyring(path)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="does not exist"):
        Keyring(tmp_path / "missing.json")
    assert Keyring(path).current == keyring.current
    monkeypatch.setenv("ADAPTLOOP_STORAGE_ROOT", str(tmp_path))
    monkeypatch.setenv("ADAPTLOOP_STORAGE__ENCRYPTION__ENABLED", "true")
    with pytest.raises(ConfigError, match="keyring must be set"):
        load_settings()
    monkeypatch.setenv("ADAPTLOOP_STORAGE__ENCRYPTION__KEYRING", str(path))
    with pytest.raises(ConfigError, match="inside the storage root"):
        load_settings()


def test_rotate_rewraps_every_data_key_and_retire_waits_until_nothing_needs_the_old_key(tmp_path):
    store = sealed_store(tmp_path)
    for user in ("ana", "bo", "cy"):
        store.write_personal(f"{user}.jsonl", user.encode(), user)
    keyring = store.sealer.keyring
    old = keyring.current
    plain = ArtifactStore(str(tmp_path / "store"))
    with pytest.raises(ConfigError, match="is the current key"):
        retire(plain, keyring, old)
    before = {p: (tmp_path / "store" / p).read_bytes() for p in ("ana.jsonl", "bo.jsonl", "cy.jsonl")}
    result = rotate(plain, keyring)
    assert (result.rewrapped, result.already) == (3, 0) and keyring.current == result.new_key != old
    assert {p: (tmp_path / "store" / p).read_bytes() for p in before} == before, "no artifact re-encrypted"
    retire(plain, keyring, old)
    assert keyring.ids() == [result.new_key]
    fresh = Sealer(plain, Keyring(keyring.path))  # a new process, the rotated keyring only
    assert [fresh.open(data) for data in before.values()] == [b"ana", b"bo", b"cy"]


def test_retire_is_refused_while_a_data_key_still_needs_the_key(tmp_path):
    store = sealed_store(tmp_path)
    store.write_personal("ana.jsonl", b"a", "ana")
    keyring, plain = store.sealer.keyring, ArtifactStore(str(tmp_path / "store"))
    old = keyring.current
    keyring.add()  # a rotation that stopped before re-wrapping anything
    with pytest.raises(ConfigError, match="still wraps 1 data key"):
        retire(plain, keyring, old)
    with pytest.raises(ConfigError, match="not a key id"):
        retire(plain, keyring, "../etc")
    assert [row["data_keys"] for row in keyring_summary(plain, keyring)] == [1, 0]


def test_a_rotation_killed_midway_loses_nothing_and_a_second_run_finishes_it(tmp_path):
    store = sealed_store(tmp_path)
    users = [f"user-{n}" for n in range(1500)]
    for user in users:
        store.sealer.seal(user, b"x")  # makes the user's data key
    sealed = {user: store.sealer.seal(user, user.encode()) for user in users[:50]}
    keyring = store.sealer.keyring
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"storage_root": str(tmp_path / "store")}))
    command = [sys.executable, "-m", "adaptloop.cli", "--config", str(config), "keys", "rotate", "--keyring", str(keyring.path)]
    plain = ArtifactStore(str(tmp_path / "store"))

    def wrapped_by() -> dict[str, int]:
        counts: dict[str, int] = {}
        for path in (tmp_path / "store/privacy/keys").glob("*.json"):
            try:
                kek = json.loads(path.read_bytes())["kek_id"]
            except ValueError:
                continue
            counts[kek] = counts.get(kek, 0) + 1
        return counts

    for _attempt in range(5):  # until the kill lands midway (a fast disk may finish a rotation first)
        start = keyring.current
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        begun = lambda p=proc: p.poll() is not None or len(wrapped_by()) > 1  # noqa: E731
        wait_until(begun, timeout=120, what="the rotation to begin", interval=0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if wrapped_by().get(start, 0) > 0 and len(wrapped_by()) > 1:
            break
    counts = wrapped_by()
    assert len(counts) == 2 and sum(counts.values()) == len(users), f"killed midway: {counts}"
    # Every data key opens, under the old key or the new: nothing lost.
    reader = Sealer(plain, Keyring(keyring.path))
    assert all(reader.open(data) == user.encode() for user, data in sealed.items())
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
    current = Keyring(keyring.path).current
    assert wrapped_by() == {current: len(users)}
    for key_id in Keyring(keyring.path).ids():
        if key_id != current:
            retire(plain, Keyring(keyring.path), key_id)
    assert Keyring(keyring.path).ids() == [current]
    reader = Sealer(plain, Keyring(keyring.path))
    assert all(reader.open(data) == user.encode() for user, data in sealed.items())


def test_deleting_a_users_key_file_makes_every_copy_of_their_files_unreadable(tmp_path):
    store = sealed_store(tmp_path)
    store.write_personal("ana.jsonl", b"ana's data", "ana")
    store.write_personal("bo.jsonl", b"bo's data", "bo")
    backup = (tmp_path / "store/ana.jsonl").read_bytes()
    store.remove(key_file(store.sealer.hasher("ana")))
    store.sealer.forget(store.sealer.hasher("ana"))
    with pytest.raises(StorageError, match="data key is gone"):
        store.sealer.open(backup)
    assert store.read_bytes("bo.jsonl") == b"bo's data"


def test_a_sealer_holds_the_most_recently_used_keys_only_and_reads_the_others_again(tmp_path, monkeypatch):
    monkeypatch.setattr("core.encryption.KEYS_HELD", 2)
    store = sealed_store(tmp_path)
    for user in ("ana", "bo", "cy"):
        store.write_personal(f"{user}.jsonl", f"{user}'s data".encode(), user)
    held = lambda: set(store.sealer._keys)  # noqa: E731
    assert held() == {store.sealer.hasher("bo"), store.sealer.hasher("cy")}, "ana's key, the least recent, let go"
    assert store.read_bytes("ana.jsonl") == b"ana's data", "read again from ana's key file"
    assert store.read_bytes("cy.jsonl") == b"cy's data"  # bo let go for ana; cy used since, so ana goes next
    store.write_personal("dee.jsonl", b"dee's data", "dee")
    assert held() == {store.sealer.hasher("cy"), store.sealer.hasher("dee")}
    assert [store.read_bytes(f"{u}.jsonl") for u in ("ana", "bo")] == [b"ana's data", b"bo's data"]
