"""The adapter registry: per-user versions, an atomic active pointer, history, audit.

Layout under `<storage_root>/models/adapters/` (the seed's file names):

    adapters_index.json                 every user's active version (a derived view)
    audit.jsonl                         append-only: every registry event
    adapter_validation_results.jsonl    append-only: every validation gate result
    rollback_log.jsonl                  append-only: every rollback
    reviews.jsonl                       append-only: every change of a review (schemas/review.py)
    users/<user_id>/active.json         THE active pointer (write, fsync, rename)
    users/<user_id>/adapter_history.json
    users/<user_id>/promotion.json      the user's own promotion mode, when set (trainer/review.py)
    users/<user_id>/v<N>/               adapter_config.json, adapter_model.safetensors,
                                        manifest.json (sha256 of every file, lineage, ...)
    archive/<user_id>/v<N>/             versions beyond max_adapter_versions

A version directory is written under a temporary name, fsynced and renamed,
so it exists whole or not at all; the pointer is swapped the same way, so a
crash at any instant leaves the old or the new version active, never half.
Loading verifies every file's sha256 and refuses a mismatch.

With encryption at rest (a `sealer`, core/encryption.py) the two adapter
files are sealed for their user; the manifest keeps the sha256 of the
plaintext (the version's identity, as without encryption) and of what is on
disk (`sealed_files`). `verify` checks the files as stored (no keys
needed); loading opens them, where AES-GCM refuses any changed byte and the
plaintext's sha256 sealed in each file's header must be the version's
identity. Whatever loads a version gets its plaintext from `adapter_files`
or `plain_dir`, never from the files.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from core.encryption import Sealer, sealer_for
from core.errors import ReviewError, RollbackError, StorageError, VersionNotFound
from core.storage import atomic_write, atomic_write_json, file_sha256, fsync_dir, local_path, open_sealed, sha256_bytes
from schemas.common import check_user_id
from schemas.manifest import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST_VERSION, AdapterManifest
from schemas.review import Review

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger("adaptloop.registry")

MANIFEST = "manifest.json"
VALIDATION_LOG = "adapter_validation_results.jsonl"
ROLLBACK_LOG = "rollback_log.jsonl"
REVIEWS_LOG = "reviews.jsonl"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
REGISTRY_DIR = "models/adapters"  # the registry's root, under the storage root


def user_checkpoints(user_hash: str) -> str:
    """Where a user's running jobs keep their checkpoints, under the storage root: by salted hash, so a forget finds them."""
    return f"{REGISTRY_DIR}/checkpoints/{user_hash}"


def version_label(version: int | None) -> str:
    """'v3', or 'base model' for None (no adapter active)."""
    return "base model" if version is None else f"v{version}"


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _open_log_for_append(path: Path) -> int:
    """An O_APPEND descriptor of the log, share-locked, that is still the file at `path`.

    A forget rewrites a log under an exclusive lock and renames the new file
    over it; an appender that opened the old file waits for the lock, sees
    the old file gone, and opens the new one, so its line is never lost.
    """
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _is_users_line(line: bytes, user_id: str) -> bool:
    try:
        return json.loads(line).get("user_id") == user_id
    except ValueError:
        return False


def _is_tombstone(line: bytes, tombstone: dict[str, Any]) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return all(record.get(k) == v for k, v in tombstone.items() if k != "reason")


def read_manifest(path: Path) -> AdapterManifest:
    """The manifest in `path` (a version directory); StorageError when it is missing or corrupt."""
    try:
        return AdapterManifest.from_json((path / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise StorageError(f"{path} has no {MANIFEST}") from None
    except (ValueError, ValidationError) as exc:
        raise StorageError(f"{path / MANIFEST} is corrupt: {str(exc).splitlines()[0]}") from None


def verify_adapter_dir(path: Path) -> AdapterManifest | None:
    """Check an adapter directory before anything loads it; its manifest, or None for a bare PEFT adapter.

    Both PEFT files must be there; a directory with a manifest (a registry
    version) must match every sha256 it lists for the files as stored (the
    sealed files' when encrypted: no keys needed): a mismatch is refused.
    """
    manifest = _manifest_of(Path(path))
    if manifest is not None:
        _check_files(Path(path), manifest.sealed_files or manifest.files)
    return manifest


def _manifest_of(path: Path) -> AdapterManifest | None:
    for name in ADAPTER_FILES:
        if not (path / name).is_file():
            raise StorageError(f"{path} is not a PEFT adapter directory: {name} is missing")
    return read_manifest(path) if (path / MANIFEST).is_file() else None


def _check_files(path: Path, expected: dict[str, str], stored: dict[str, bytes] | None = None) -> None:
    """Every file's sha256 (from `stored` when read already) against `expected`; StorageError on a mismatch."""
    for name, sha in expected.items():
        file = path / name
        if stored is not None and name in stored:
            actual = sha256_bytes(stored[name])
        else:
            actual = file_sha256(file) if file.is_file() else "missing"
        _check_sha(file, actual, sha)


def _check_sha(path: Path, actual: str, expected: str) -> None:
    if actual != expected:
        raise StorageError(f"{path}: sha256 mismatch (manifest {expected[:12]}, file {actual[:12]}); refusing to load it")


def adapter_files(path: Path, sealer: Sealer | None) -> dict[str, bytes]:
    """The adapter's two files as trained, each read once: what loading reads.

    Every sha256 the manifest lists is checked; a sealed file is opened
    instead (`_opened`)."""
    path = Path(path)
    manifest = _manifest_of(path)
    stored = {name: (path / name).read_bytes() for name in ADAPTER_FILES}
    if manifest is None:
        return {name: open_sealed(data, sealer, path / name) for name, data in stored.items()}
    if not manifest.sealed_files:
        _check_files(path, manifest.files, stored)
        return stored
    if sealer is None:
        raise StorageError(f"{path} is encrypted: set storage.encryption.enabled and storage.encryption.keyring to read it")
    return _opened(path, manifest, stored, sealer)


def _opened(path: Path, manifest: AdapterManifest, stored: dict[str, bytes], sealer: Sealer) -> dict[str, bytes]:
    """The plaintext of a sealed version's files, each one's sealed digest checked against the version's identity.

    AES-GCM's tag authenticates every byte of a sealed file, and its header
    carries the plaintext's sha256: a file that opens, with that digest equal
    to the manifest's `files`, is this version's file. Hashing the stored
    bytes as well (what `verify` does, without keys) would add nothing but a
    second pass over the weights."""
    _check_files(path, {name: sha for name, sha in manifest.sealed_files.items() if name not in stored})
    files = {}
    for name, data in stored.items():
        files[name], digest = sealer.open_with_digest(data, str(path / name))
        _check_sha(path / name, digest, manifest.files.get(name, ""))
    return files


def plain_dir(path: Path, sealer: Sealer | None, target: Path) -> Path:
    """A directory PEFT can load the adapter from: `path` itself, or its opened files written to `target` when sealed.

    Every file is checked first (as `adapter_files` does): a tampered version is refused, never loaded."""
    manifest = _manifest_of(Path(path))
    if manifest is None or not manifest.sealed_files:
        if manifest is not None:
            _check_files(Path(path), manifest.files)
        return Path(path)
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, data in adapter_files(path, sealer).items():
        # A scratch copy for one load, removed after it: private, no fsync (a crash loses nothing kept).
        fd = os.open(target / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return target


@dataclass(frozen=True)
class VersionInfo:
    user_id: str
    version: int
    path: Path
    manifest: AdapterManifest


class AdapterRegistry:
    def __init__(self, storage_root: str | Path, max_versions: int = 5, sealer: Sealer | None = None) -> None:
        try:
            root = local_path(str(storage_root))
        except StorageError:
            raise StorageError(
                f"the adapter registry needs a local storage_root (an atomic rename); got {storage_root}"
            ) from None
        self.storage_root = root.resolve()
        self.root = (root / REGISTRY_DIR).resolve()
        self.max_versions = max_versions
        self.sealer = sealer  # encryption at rest: versions are sealed for their user

    @classmethod
    def from_settings(cls, settings: Settings) -> AdapterRegistry:
        """The registry the settings describe, encryption at rest included."""
        root = settings.storage_root
        return cls(root, settings.max_adapter_versions, sealer_for(root, settings.storage.encryption))

    # ---- paths ------------------------------------------------------------ #

    def user_dir(self, user_id: str) -> Path:
        path = (self.root / "users" / check_user_id(user_id)).resolve()
        if path.parent != (self.root / "users").resolve():
            raise StorageError(f"user_id {user_id!r} resolves outside the registry")
        return path

    def checkpoint_dir(self, user_hash: str, request_id: str) -> Path:
        """The checkpoint of one request's job (`trainer/checkpoint.py`)."""
        return self.storage_root / user_checkpoints(user_hash) / request_id

    def version_dir(self, user_id: str, version: int) -> Path:
        return self.user_dir(user_id) / f"v{int(version)}"

    # ---- audit ------------------------------------------------------------ #

    def _append(self, name: str, record: dict[str, Any]) -> None:
        """Append one JSON line to a log (O_APPEND: whole lines, never interleaved, never torn).

        A write the disk cannot take whole (ENOSPC part-way) is cut back off,
        so the log always parses; the caller gets a StorageError.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        line = (json.dumps({"at": _now(), **record}, sort_keys=True) + "\n").encode()
        path = self.root / name
        fd = _open_log_for_append(path)
        try:
            size = os.fstat(fd).st_size
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (wrote {written} of {len(line)} bytes)")
                os.fsync(fd)
            except OSError as exc:
                os.ftruncate(fd, size)
                raise StorageError(f"could not append to {path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)

    def _read_log(self, name: str, user_id: str | None = None) -> list[dict]:
        path = self.root / name
        if not path.exists():
            return []
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    # Only an outside hand (or a crash of the machine) can leave one: skip it, loudly.
                    log.warning("%s line %d is not JSON; skipped", path, number)
        return records if user_id is None else [r for r in records if r.get("user_id") == user_id]

    def audit(self, event: str, user_id: str, **fields: Any) -> None:
        self._append("audit.jsonl", {"event": event, "user_id": user_id, **fields})

    def audit_log(self) -> list[dict]:
        return self._read_log("audit.jsonl")

    def log_validation(self, user_id: str, version: int | None, report: dict[str, Any], **fields: Any) -> None:
        """Record one gate result (every case's scores) in the validation log."""
        self._append(VALIDATION_LOG, {"user_id": user_id, "version": version, **fields, **report})

    def validation_results(self, user_id: str | None = None) -> list[dict]:
        return self._read_log(VALIDATION_LOG, user_id)

    def rollback_log(self, user_id: str | None = None) -> list[dict]:
        return self._read_log(ROLLBACK_LOG, user_id)

    # ---- reviews ---------------------------------------------------------- #

    def record_review(self, review: Review) -> None:
        """Append a review's new state to the reviews log (the newest line of a review is its state)."""
        self._append(REVIEWS_LOG, review.model_dump(mode="json", exclude_none=True))

    def reviews(self, user_id: str | None = None) -> list[Review]:
        """Every review (or the user's), in its newest state, oldest first."""
        latest: dict[str, Review] = {}
        for record in self._read_log(REVIEWS_LOG, user_id):
            record.pop("at", None)
            try:
                review = Review.model_validate(record)
            except ValidationError:
                log.warning("%s holds a line that is not a review; skipped", self.root / REVIEWS_LOG)
                continue
            latest[review.review_id] = review
        return sorted(latest.values(), key=lambda r: r.opened_at)

    def review(self, review_id: str) -> Review:
        """One review in its newest state; ReviewError when there is none by that ID."""
        for review in self.reviews():
            if review.review_id == review_id:
                return review
        raise ReviewError(f"no review {review_id} (`adaptloop review list` shows the pending ones)")

    @contextmanager
    def reviews_locked(self) -> Iterator[None]:
        """Hold the registry's review lock: a review is decided once, whoever tries (two trainers, the API, the CLI)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".reviews.lock", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def user_promotion_mode(self, user_id: str) -> str | None:
        """The user's own promotion mode (`auto` or `review`), or None: the configured one applies."""
        try:
            return json.loads((self.user_dir(user_id) / "promotion.json").read_text(encoding="utf-8"))["mode"]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError) as exc:
            raise StorageError(f"promotion mode of {user_id} is corrupt: {exc}") from None

    def set_user_promotion_mode(self, user_id: str, mode: str | None, by: str) -> None:
        """Set the user's own promotion mode; None removes it (the configured one applies again). Audited."""
        path = self.user_dir(user_id) / "promotion.json"
        if mode is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {"mode": mode, "at": _now(), "by": by})
        self.audit("promotion_mode", user_id, mode=mode, by=by)

    # ---- forget ----------------------------------------------------------- #

    def forget(self, user_id: str, user_hash: str, at: str, reason: str) -> list[str]:
        """Delete every version, archive and pointer of the user; their log lines become one tombstone per log.

        A tombstone says only that someone was forgotten: the salted hash, the
        time and the reason. Idempotent: a second run finds nothing more to
        delete and keeps the one tombstone. Returns what it removed.
        """
        removed = []
        for path in (self.user_dir(user_id), self.root / "archive" / check_user_id(user_id)):
            if path.exists():
                shutil.rmtree(path)
                removed.append(str(path.relative_to(self.root)))
        tombstone = {"event": "forgotten", "user_hash": user_hash, "at": at, "reason": reason}
        for name in ("audit.jsonl", VALIDATION_LOG, ROLLBACK_LOG, REVIEWS_LOG):
            if self._drop_user_lines(name, user_id, tombstone):
                removed.append(f"{name}: the user's lines")
        index = self.root / "adapters_index.json"
        if index.exists():
            entries = json.loads(index.read_text(encoding="utf-8"))
            if entries.pop(user_id, None) is not None:
                atomic_write_json(index, entries)
                removed.append("adapters_index.json: the user's entry")
        return removed

    def _drop_user_lines(self, name: str, user_id: str, tombstone: dict[str, Any]) -> bool:
        path = self.root / name
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # appends wait; the rename below replaces the file they would write to
            lines = path.read_bytes().splitlines(keepends=True)
            kept = [line for line in lines if not _is_users_line(line, user_id)]
            marked = any(_is_tombstone(line, tombstone) for line in kept)
            if len(kept) == len(lines):
                return False
            if not marked:
                kept.append((json.dumps(tombstone, sort_keys=True) + "\n").encode())
            atomic_write(path, b"".join(kept), mode=0o644)
            return True
        finally:
            os.close(fd)

    # ---- register --------------------------------------------------------- #

    def register(self, user_id: str, adapter_dir: Path, manifest: AdapterManifest) -> VersionInfo:
        """Add the adapter in `adapter_dir` as the user's next version (a candidate, not active)."""
        user = self.user_dir(user_id)
        user.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=user, prefix=".staging-"))
        try:
            files, sealed = self._store_files(user_id, Path(adapter_dir), staging)
            version = self._next_version(user_id)
            full = manifest.model_copy(
                update={
                    "manifest_version": MANIFEST_VERSION,
                    "user_id": user_id,
                    "version": version,
                    "files": files,
                    "sealed_files": sealed,
                    "registered_at": datetime.now(UTC),
                }
            )
            (staging / MANIFEST).write_bytes(full.to_json())
            for name in (*ADAPTER_FILES, MANIFEST):
                with open(staging / name, "rb") as fh:
                    os.fsync(fh.fileno())
            target = self.version_dir(user_id, version)
            os.rename(staging, target)  # atomic; fails if a concurrent writer took the number
            fsync_dir(user)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise StorageError(f"could not write {user_id}'s new version under {user}: {exc.strerror or exc}") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._append_history(
            user_id,
            {
                "version": version,
                "status": "candidate",
                "at": _now(),
                "request_id": manifest.request_id,
                "metrics": manifest.metrics.numbers(),
            },
        )
        self.audit("registered", user_id, version=version, request_id=manifest.request_id, files=files)
        return VersionInfo(user_id, version, target, full)

    def _store_files(self, user_id: str, adapter_dir: Path, staging: Path) -> tuple[dict[str, str], dict[str, str]]:
        """Copy the PEFT files into `staging` (sealed for the user when encrypting); their sha256, plain and as stored."""
        files, sealed = {}, {}
        for name in ADAPTER_FILES:
            src = adapter_dir / name
            if not src.is_file():
                raise StorageError(f"{src} is missing: not a PEFT adapter directory")
            if self.sealer is None:
                shutil.copyfile(src, staging / name)
                files[name] = file_sha256(staging / name)
                continue
            data = src.read_bytes()
            files[name] = sha256_bytes(data)
            stored = self.sealer.seal(user_id, data, files[name])
            (staging / name).write_bytes(stored)
            sealed[name] = sha256_bytes(stored)
        return files, sealed

    def files(self, info: VersionInfo) -> dict[str, bytes]:
        """A version's adapter files as trained, every sha256 checked (`adapter_files` with this registry's keys)."""
        try:
            return adapter_files(info.path, self.sealer)
        except StorageError as exc:
            raise StorageError(f"{info.user_id} v{info.version}: {exc}") from None

    def plain_dir(self, path: Path, target: Path) -> Path:
        """`plain_dir` with this registry's keys: where PEFT loads the version in `path` from."""
        return plain_dir(path, self.sealer, target)

    def _next_version(self, user_id: str) -> int:
        numbers = [v for v in self._version_numbers(user_id)]
        archived = self.root / "archive" / user_id
        if archived.is_dir():
            numbers += [int(p.name[1:]) for p in archived.iterdir() if p.name.startswith("v") and p.name[1:].isdigit()]
        return max(numbers, default=0) + 1

    def _version_numbers(self, user_id: str) -> list[int]:
        user = self.user_dir(user_id)
        if not user.is_dir():
            return []
        return sorted(int(p.name[1:]) for p in user.iterdir() if p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit())

    # ---- read ------------------------------------------------------------- #

    def users(self) -> list[str]:
        """Every user with a directory in the registry."""
        users = self.root / "users"
        return sorted(p.name for p in users.iterdir() if p.is_dir()) if users.is_dir() else []

    def versions(self, user_id: str) -> list[VersionInfo]:
        return [self.info(user_id, v) for v in self._version_numbers(user_id)]

    def info(self, user_id: str, version: int) -> VersionInfo:
        path = self.version_dir(user_id, version)
        if not (path / MANIFEST).is_file():
            raise VersionNotFound(f"{user_id} has no version {version}")
        return VersionInfo(user_id, version, path, read_manifest(path))

    def find_by_request(self, user_id: str, request_id: str) -> VersionInfo | None:
        """The version a request already produced (idempotency by request_id)."""
        for info in self.versions(user_id):
            if info.manifest.request_id == request_id:
                return info
        return None

    def verify(self, user_id: str, version: int) -> VersionInfo:
        """Check every file against the manifest's sha256; raise StorageError on any mismatch."""
        info = self.info(user_id, version)
        try:
            verify_adapter_dir(info.path)
        except StorageError as exc:
            raise StorageError(f"{user_id} v{version}: {exc}") from None
        return info

    # ---- the active pointer ---------------------------------------------- #

    def active(self, user_id: str) -> int | None:
        path = self.user_dir(user_id) / "active.json"
        try:
            version = json.loads(path.read_text(encoding="utf-8"))["version"]
            return None if version is None else int(version)  # None: the base model (a rollback past v1)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError) as exc:
            raise StorageError(f"active pointer of {user_id} is corrupt: {exc}") from None

    def activate(self, user_id: str, version: int, reason: str, event: str = "promoted") -> int | None:
        """Make `version` active atomically (after verifying it); return the previous active version."""
        self.verify(user_id, version)
        previous = self.active(user_id)
        atomic_write_json(self.user_dir(user_id) / "active.json", {"version": version, "at": _now(), "reason": reason})
        self._append_history(
            user_id, {"version": version, "status": "active", "at": _now(), "reason": reason, "previous": previous}
        )
        self.audit(event, user_id, version=version, previous=previous, reason=reason)
        self._write_index(user_id, version)
        self._archive_old(user_id)
        return previous

    def mark(self, user_id: str, version: int, status: str, **fields: Any) -> None:
        """Record a status (rejected, failed, ...) in the user's history and the audit log."""
        self._append_history(user_id, {"version": version, "status": status, "at": _now(), **fields})
        self.audit(status, user_id, version=version, **fields)

    def rollback(
        self, user_id: str, reason: str, to_version: int | None = None, requested_by: str = "cli", command_id: str | None = None
    ) -> tuple[int | None, int | None]:
        """Make an earlier good version (or `to_version`) active; return (new, previous).

        The previous good version is the newest version below the active one
        that was active before and is still kept (not rolled back from, not
        archived) and verifies. When the active version has none before it,
        the user goes back to the base model (new = None): the first adapter
        is as reversible as any. Nothing active -> RollbackError, nothing changed.
        """
        current = self.active(user_id)
        if to_version is not None:
            if to_version == current:
                raise RollbackError(f"{user_id} v{to_version} is already active")
            if to_version not in self._version_numbers(user_id):
                raise RollbackError(
                    f"{user_id} has no kept version {to_version} (kept: {self._version_numbers(user_id) or 'none'})"
                )
            target: int | None = to_version
        elif current is None:
            raise RollbackError(f"{user_id} has no active adapter (the base model answers); nothing to roll back")
        else:
            target = self.previous_good(user_id)
        if target is not None:
            try:
                self.verify(user_id, target)
            except StorageError as exc:
                raise RollbackError(f"cannot roll back to {user_id} v{target}: {exc}") from None
        if current is not None:
            self.mark(user_id, current, "rolled_back_from", reason=reason)
        if target is None:
            self._deactivate(user_id, reason=f"rollback: {reason}", previous=current)
        else:
            self.activate(user_id, target, reason=f"rollback: {reason}", event="rolled_back")
        self._append(
            ROLLBACK_LOG,
            {
                "user_id": user_id,
                "from_version": current,
                "to_version": target,
                "reason": reason,
                "requested_by": requested_by,
                "command_id": command_id,
            },
        )
        return target, current

    def _deactivate(self, user_id: str, reason: str, previous: int | None) -> None:
        """Point the user at the base model (atomically, like activate)."""
        atomic_write_json(self.user_dir(user_id) / "active.json", {"version": None, "at": _now(), "reason": reason})
        self._append_history(
            user_id, {"version": None, "status": "base_model", "at": _now(), "reason": reason, "previous": previous}
        )
        self.audit("rolled_back", user_id, version=None, previous=previous, reason=reason)
        self._write_index(user_id, None)

    def previous_good(self, user_id: str) -> int | None:
        current = self.active(user_id)
        history = self.history(user_id)
        was_active = {e["version"] for e in history if e.get("status") == "active"}
        bad = {e["version"] for e in history if e.get("status") in ("rolled_back_from", "corrupt")}
        kept = set(self._version_numbers(user_id))
        for version in sorted(was_active & kept - bad, reverse=True):
            if current is None or version < current:
                return version
        return None

    def history(self, user_id: str) -> list[dict]:
        path = self.user_dir(user_id) / "adapter_history.json"
        if not path.exists():
            return []
        return json.loads(path.read_text(encoding="utf-8"))

    def _append_history(self, user_id: str, entry: dict) -> None:
        history = self.history(user_id)
        history.append(entry)
        atomic_write_json(self.user_dir(user_id) / "adapter_history.json", history)

    def _write_index(self, user_id: str, version: int | None) -> None:
        path = self.root / "adapters_index.json"
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            index = {}
        index[user_id] = {"active": version, "updated_at": _now()}
        atomic_write_json(path, index)

    def _archive_old(self, user_id: str) -> None:
        """Versions beyond `max_versions`, oldest first, to the archive; never the active one or one awaiting review."""
        active = self.active(user_id)
        numbers = self._version_numbers(user_id)
        excess = len(numbers) - self.max_versions
        if excess <= 0:
            return
        kept = {active} | {r.version for r in self.reviews(user_id) if r.pending}
        for version in numbers:
            if excess <= 0:
                break
            if version in kept:
                continue
            target = self.root / "archive" / user_id / f"v{version}"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.version_dir(user_id, version), target)
            self.audit("archived", user_id, version=version)
            excess -= 1
