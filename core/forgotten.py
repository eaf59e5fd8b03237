"""How adaptloop remembers that someone was forgotten without keeping who: salted hashes and markers.

    hasher = UserHasher.for_store(store)     # one salt per storage root, made on first use
    hasher("ana")                            # 32 hex digits, the same on every side of the loop
    markers = ForgetMarkers(store)
    markers.since(hasher("ana"))             # the forget time (epoch seconds), or None

A marker (`privacy/forgotten/<hash>.json`) is written before a forget
deletes anything and says "done" at its end: a trainer checks it before it
registers a version (a job in flight for a forgotten user is dropped), and
a forget killed midway finds it and finishes with the same time.

The salt is a random 32-byte file in the store (`privacy/user-hash-salt`,
mode 0600) that forget never deletes: without it a forgotten user's hash
cannot be recomputed from a guessed id, with it the worker, the trainers,
`replay` and `serve` all recognise a forgotten user. HMAC-SHA256, cut to
128 bits.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime

from pydantic import BaseModel

from core.errors import StorageError
from core.storage import ArtifactStore

SALT_FILE = "privacy/user-hash-salt"
MARKERS_DIR = "privacy/forgotten"
SALT_BYTES = 32


class UserHasher:
    def __init__(self, salt: bytes) -> None:
        if len(salt) < 16:
            raise StorageError(f"the user-hash salt is {len(salt)} bytes; it needs at least 16 ({SALT_FILE})")
        self._salt = salt

    def __call__(self, user_id: str) -> str:
        return hmac.new(self._salt, user_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    @classmethod
    def for_store(cls, store: ArtifactStore) -> UserHasher:
        return cls(store.create_once(SALT_FILE, secrets.token_bytes(SALT_BYTES)))


class ForgetMarker(BaseModel):
    user_hash: str
    at: float  # the forget time, epoch seconds
    reason: str
    state: str = "started"  # started | done

    @property
    def when(self) -> datetime:
        """The forget time as a datetime (UTC)."""
        return datetime.fromtimestamp(self.at, UTC)


class ForgetMarkers:
    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    def _path(self, user_hash: str) -> str:
        return f"{MARKERS_DIR}/{user_hash}.json"

    def read(self, user_hash: str) -> ForgetMarker | None:
        if not self.store.exists(self._path(user_hash)):
            return None
        return ForgetMarker.model_validate_json(self.store.read_bytes(self._path(user_hash)))

    def write(self, marker: ForgetMarker) -> None:
        self.store.write_bytes(self._path(marker.user_hash), marker.model_dump_json().encode())

    def since(self, user_hash: str) -> float | None:
        marker = self.read(user_hash)
        return None if marker is None else marker.at
