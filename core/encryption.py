"""Encryption at rest: AES-GCM per file, per-user data keys, key-encryption keys in a keyring outside the root.

    keyring = Keyring.create(Path("/etc/adaptloop/keyring.json"))    # `adaptloop keys init`
    sealer = Sealer(ArtifactStore(root), keyring)
    sealed = sealer.seal("ana", b"...")        # a fresh file key, wrapped by ana's data key
    sealer.open(sealed)                         # b"..."; a flipped byte is a StorageError

Three layers, so that rotating keys re-wraps a few small files and
forgetting someone destroys exactly their key:

    keyring file (outside the storage root, mode 0600)
        key-encryption keys (KEKs), one of them current
    privacy/keys/<user hash>.json (in the root)
        the user's data key, wrapped by one KEK (its id is in the file)
    every sealed file
        MAGIC, the owner's hash, the plaintext's sha256, a fresh file key
        wrapped by the owner's data key, then the content: AES-GCM with the
        header as associated data

`rotate` adds a KEK and re-wraps every data key under it; no artifact is
re-encrypted. A forget deletes the user's key file: copies of their files
elsewhere (backups) can no longer be opened. Files that belong to many
users (the global example pool) have the owner `shared`.

A sealed file starts with MAGIC, so a reader tells sealed from plain files
(written before encryption was switched on) by their first bytes.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import stat
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, ValidationError

from core.errors import ConfigError, StorageError
from core.forgotten import UserHasher
from core.settings import EncryptionSettings
from core.storage import SEALED_MAGIC, ArtifactStore, atomic_write, inside_root, open_sealed

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = SEALED_MAGIC
DIGEST_BYTES = 32  # the plaintext's sha256, in the authenticated header
Bytes = bytes | memoryview
KEYS_DIR = "privacy/keys"
SHARED = "shared"  # owner of files that hold several users' data (the global pool)
KEY_BYTES = 32
NONCE_BYTES = 12
_WRAPPED_BYTES = KEY_BYTES + 16  # AES-GCM adds a 16-byte tag
KEYS_HELD = 4096  # owners' data keys a sealer keeps in memory, the most recently used (about 1.3 MiB in all)
_KEY_ID = re.compile(r"^k-[0-9a-f]{12}$")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _aesgcm(key: bytes) -> AESGCM:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def _decrypt(cipher: AESGCM, nonce: Bytes, data: Bytes, aad: Bytes, what: str) -> bytes:
    from cryptography.exceptions import InvalidTag

    try:
        return cipher.decrypt(nonce, data, aad)
    except InvalidTag:
        raise StorageError(f"{what} failed its integrity check (a changed byte, or the wrong key); refusing it") from None


def is_sealed(data: bytes) -> bool:
    return data.startswith(MAGIC)


# ---- the keyring -------------------------------------------------------------- #


class _Kek(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    key: str  # base64 of 32 bytes
    created: str


class _KeyringFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int = 1
    current: str
    keys: list[_Kek]


class Keyring:
    """The key-encryption keys: a JSON file, mode 0600, outside the storage root; one key is current.

    Reloaded when the file changes, so a long-running process wraps new data
    keys under the key `rotate` made current, never under a retired one.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._file = self._read()

    # ---- the file ---------------------------------------------------------- #

    @classmethod
    def create(cls, path: Path) -> Keyring:
        """A new keyring with one key (`adaptloop keys init`); refuses to overwrite one."""
        path = Path(path)
        if path.exists():
            raise ConfigError(f"{path} exists already: a keyring is created once (rotate adds keys to it)")
        kek = _new_kek()
        _write(path, _KeyringFile(current=kek.id, keys=[kek]))
        return cls(path)

    def _read(self) -> _KeyringFile:
        try:
            info = self.path.stat()
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                f"storage.encryption.keyring: {self.path} does not exist (create it with `adaptloop keys init --keyring PATH`)"
            ) from None
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise ConfigError(f"storage.encryption.keyring: {self.path} is readable by others; chmod 600 it")
        try:
            parsed = _KeyringFile.model_validate_json(raw)
        except ValidationError as exc:
            raise ConfigError(f"storage.encryption.keyring: {self.path} is not a keyring: {str(exc).splitlines()[0]}") from None
        if parsed.current not in {k.id for k in parsed.keys}:
            raise ConfigError(f"storage.encryption.keyring: {self.path}: the current key {parsed.current} is not in it")
        self._seen = (info.st_mtime_ns, info.st_ino)
        return parsed

    def _fresh(self) -> _KeyringFile:
        with self._lock:
            try:
                info = self.path.stat()
                if (info.st_mtime_ns, info.st_ino) != self._seen:
                    self._file = self._read()
            except FileNotFoundError:
                pass  # keep what was read: a missing file is reported by the CLI, not mid-write
            return self._file

    # ---- keys -------------------------------------------------------------- #

    @property
    def current(self) -> str:
        return self._fresh().current

    def ids(self) -> list[str]:
        return [k.id for k in self._fresh().keys]

    def key(self, key_id: str) -> bytes:
        for kek in self._fresh().keys:
            if kek.id == key_id:
                return _unb64(kek.key)
        raise StorageError(f"key {key_id} is not in the keyring {self.path} (retired, or another keyring)")

    def add(self) -> str:
        """A new key, made current (the first step of `rotate`); its id."""
        kek = _new_kek()
        now = self._fresh()
        _write(self.path, _KeyringFile(current=kek.id, keys=[*now.keys, kek]))
        self._fresh()
        return kek.id

    def remove(self, key_id: str) -> None:
        now = self._fresh()
        if key_id == now.current:
            raise ConfigError(f"{key_id} is the current key; rotate first, then retire it")
        if key_id not in {k.id for k in now.keys}:
            raise ConfigError(f"{key_id} is not in the keyring {self.path}")
        _write(self.path, _KeyringFile(current=now.current, keys=[k for k in now.keys if k.id != key_id]))
        self._fresh()


def _new_kek() -> _Kek:
    return _Kek(id=f"k-{secrets.token_hex(6)}", key=_b64(secrets.token_bytes(KEY_BYTES)), created=datetime.now(UTC).isoformat())


def _write(path: Path, keyring: _KeyringFile) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, keyring.model_dump_json(indent=2).encode("utf-8"), mode=0o600)


# ---- data keys ---------------------------------------------------------------- #


class WrappedKey(BaseModel):
    """`privacy/keys/<owner>.json`: an owner's data key, wrapped by the KEK `kek_id`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    owner: str
    kek_id: str
    nonce: str
    wrapped: str
    created: str


def _wrap(keyring: Keyring, owner: str, data_key: bytes, created: str) -> WrappedKey:
    kek_id, nonce = keyring.current, secrets.token_bytes(NONCE_BYTES)
    wrapped = _aesgcm(keyring.key(kek_id)).encrypt(nonce, data_key, _owner_aad(owner))
    return WrappedKey(owner=owner, kek_id=kek_id, nonce=_b64(nonce), wrapped=_b64(wrapped), created=created)


def _unwrap(keyring: Keyring, record: WrappedKey) -> bytes:
    kek = _aesgcm(keyring.key(record.kek_id))
    return _decrypt(
        kek, _unb64(record.nonce), _unb64(record.wrapped), _owner_aad(record.owner), f"the data key of {record.owner}"
    )


def _owner_aad(owner: str) -> bytes:
    return b"adaptloop data key:" + owner.encode("ascii")


def key_file(owner: str) -> str:
    """Where an owner's wrapped data key lives (owner: a user's salted hash, or SHARED)."""
    return f"{KEYS_DIR}/{owner}.json"


# ---- the sealer --------------------------------------------------------------- #


class Sealer:
    """Seals and opens the files of one storage root with the keys of one keyring."""

    def __init__(self, store: ArtifactStore, keyring: Keyring) -> None:
        self.store, self.keyring = store, keyring
        self.hasher = UserHasher.for_store(store)
        # The most recently used owners' data keys, ready to wrap and unwrap file keys: a long-lived trainer or API
        # meets every user in time, and a key not held is read from its key file again (one small read and unwrap).
        self._keys: OrderedDict[str, AESGCM] = OrderedDict()
        self._lock = threading.Lock()

    def owner(self, user_id: str | None) -> str:
        """The owner name a user's files are sealed under (None: several users' data)."""
        return SHARED if user_id is None else self.hasher(user_id)

    def seal(self, user_id: str | None, data: bytes, sha256: str | None = None) -> bytes:
        """`data` encrypted for `user_id` (None: shared) under a fresh file key.

        The plaintext's sha256 (`sha256`, when the caller has it already) is
        part of the authenticated header: `open_with_digest` hands it back
        once AES-GCM has accepted the file, so a reader checks a version's
        identity without hashing the plaintext again."""
        owner = self.owner(user_id)
        digest = bytes.fromhex(sha256) if sha256 is not None else hashlib.sha256(data).digest()
        file_key, wrap_nonce, nonce = (
            secrets.token_bytes(KEY_BYTES),
            secrets.token_bytes(NONCE_BYTES),
            secrets.token_bytes(NONCE_BYTES),
        )
        head = MAGIC + bytes([len(owner)]) + owner.encode("ascii") + digest
        wrapped = self._wrapper(owner).encrypt(wrap_nonce, file_key, head)
        header = head + wrap_nonce + wrapped + nonce
        return header + _aesgcm(file_key).encrypt(nonce, data, header)

    def open(self, data: bytes, what: str = "a sealed file") -> bytes:
        """The plaintext of a sealed file; StorageError when it was changed or its owner's key is gone."""
        return self.open_with_digest(data, what)[0]

    def open_with_digest(self, data: bytes, what: str = "a sealed file") -> tuple[bytes, str]:
        """(plaintext, its sha256 as sealed); StorageError when any byte was changed or the owner's key is gone."""
        view = memoryview(data)
        if not is_sealed(data) or len(data) < len(MAGIC) + 1:
            raise StorageError(f"{what} is not sealed")
        at = len(MAGIC) + 1 + data[len(MAGIC)]
        owner = bytes(view[len(MAGIC) + 1 : at]).decode("ascii", "replace")
        at += DIGEST_BYTES
        head = view[:at]
        wrap_nonce, wrapped = view[at : at + NONCE_BYTES], view[at + NONCE_BYTES : at + NONCE_BYTES + _WRAPPED_BYTES]
        at += NONCE_BYTES + _WRAPPED_BYTES
        nonce, body = view[at : at + NONCE_BYTES], view[at + NONCE_BYTES :]
        file_key = _decrypt(self._wrapper(owner, create=False, what=what), wrap_nonce, wrapped, head, what)
        plain = _decrypt(_aesgcm(file_key), nonce, body, view[: at + NONCE_BYTES], what)
        return plain, bytes(head[-DIGEST_BYTES:]).hex()

    def forget(self, user_hash: str) -> None:
        """Drop a forgotten user's data key from memory (the file is deleted by the forget)."""
        with self._lock:
            self._keys.pop(user_hash, None)

    def _wrapper(self, owner: str, create: bool = True, what: str = "") -> AESGCM:
        with self._lock:
            if owner in self._keys:
                self._keys.move_to_end(owner)
                return self._keys[owner]
        relative = key_file(owner)
        if self.store.exists(relative):
            record = WrappedKey.model_validate_json(self.store.read_bytes(relative))
        elif create:
            fresh = _wrap(self.keyring, owner, secrets.token_bytes(KEY_BYTES), datetime.now(UTC).isoformat())
            # The first writer wins when two processes make the same owner's key at once.
            record = WrappedKey.model_validate_json(self.store.create_once(relative, fresh.model_dump_json().encode()))
        else:
            raise StorageError(f"{what}: its data key is gone (the user was forgotten, or the key file was deleted)")
        key = _aesgcm(_unwrap(self.keyring, record))
        with self._lock:
            self._keys[owner] = key
            while len(self._keys) > KEYS_HELD:
                self._keys.popitem(last=False)
        return key


_SEALERS: dict[tuple[str, str], Sealer] = {}
_SEALERS_LOCK = threading.Lock()


def sealer_for(root: str, encryption: EncryptionSettings) -> Sealer | None:
    """The sealer of `root` under the settings (None when encryption is off); one per root and keyring per process."""
    if not encryption.enabled or encryption.keyring is None:
        return None
    with _SEALERS_LOCK:
        key = (root, str(encryption.keyring))
        if key not in _SEALERS:
            keyring_outside(root, encryption.keyring)
            _SEALERS[key] = Sealer(ArtifactStore(root), Keyring(encryption.keyring))
        return _SEALERS[key]


def open_store(root: str, encryption: EncryptionSettings) -> ArtifactStore:
    """The artifact store of `root`, sealing personal files when the settings say so: the one way components get a store."""
    return ArtifactStore(root, sealer_for(root, encryption))


@dataclass(frozen=True)
class UserSeal:
    """A sealer bound to one user: how a job's own files (its checkpoints) are sealed and opened."""

    sealer: Sealer
    user_id: str

    def seal(self, data: bytes) -> bytes:
        return self.sealer.seal(self.user_id, data)

    def open(self, data: bytes, where: str | Path) -> bytes:
        return open_sealed(data, self.sealer, where)


def user_seal(sealer: Sealer | None, user_id: str) -> UserSeal | None:
    return UserSeal(sealer, user_id) if sealer is not None else None


# ---- rotation ----------------------------------------------------------------- #


@dataclass(frozen=True)
class Rotation:
    new_key: str
    rewrapped: int
    already: int
    seconds: float


def key_files(store: ArtifactStore) -> list[str]:
    return [p for p in store.list(KEYS_DIR) if p.endswith(".json")]


def rotate(store: ArtifactStore, keyring: Keyring, progress: Callable[[int, int], None] | None = None) -> Rotation:
    """Add a KEK, make it current, re-wrap every data key under it (each key file replaced atomically).

    Crash-safe: the keyring holds old and new key before the first file is
    re-wrapped, and each file is replaced whole, so every data key is
    readable under one of them at every instant; run it again to finish.
    """
    started = time.perf_counter()
    new_key = keyring.add()
    rewrapped = already = 0
    files = key_files(store)
    for n, relative in enumerate(files, 1):
        record = WrappedKey.model_validate_json(store.read_bytes(relative))
        if record.kek_id == new_key:
            already += 1
        else:
            fresh = _wrap(keyring, record.owner, _unwrap(keyring, record), record.created)
            store.write_bytes(relative, fresh.model_dump_json().encode())
            rewrapped += 1
        if progress is not None:
            progress(n, len(files))
    return Rotation(new_key, rewrapped, already, round(time.perf_counter() - started, 3))


def data_keys_per_kek(store: ArtifactStore) -> Counter[str]:
    """How many data keys each key-encryption key wraps (one read of every key file)."""
    return Counter(WrappedKey.model_validate_json(store.read_bytes(p)).kek_id for p in key_files(store))


def retire(store: ArtifactStore, keyring: Keyring, key_id: str) -> None:
    """Remove `key_id` from the keyring; refused while it is current or any data key is wrapped by it."""
    if not _KEY_ID.match(key_id):
        raise ConfigError(f"{key_id!r} is not a key id (k- and 12 hex digits; `adaptloop keys list` shows them)")
    if key_id == keyring.current:
        raise ConfigError(f"{key_id} is the current key; rotate first, then retire it")
    still = data_keys_per_kek(store)[key_id]
    if still:
        raise ConfigError(f"{key_id} still wraps {still} data key(s); run `adaptloop keys rotate` to finish re-wrapping them")
    keyring.remove(key_id)


def keyring_outside(root: str, keyring: Path) -> None:
    """Refuse a keyring under the storage root (`--keyring` given on the command line)."""
    if inside_root(root, keyring):
        raise ConfigError(f"storage.encryption.keyring: {keyring} is inside the storage root {root}; keep it elsewhere")


def keyring_summary(store: ArtifactStore, keyring: Keyring) -> list[dict]:
    """Per key: id, current or not, how many data keys it wraps (`adaptloop keys list`)."""
    counts = data_keys_per_kek(store)
    return [{"id": k, "current": k == keyring.current, "data_keys": counts[k]} for k in keyring.ids()]
