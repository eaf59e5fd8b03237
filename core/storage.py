"""The artifact store and the file helpers every side shares.

`ArtifactStore` is a local directory by default and any fsspec URL by
config. Every path handed in is relative to the root and is checked to stay
inside it, so nothing a client sends (a user_id, a version) can reach outside
the root. Local writes are atomic (temporary file, fsync, rename); remote
object stores write whole objects, which is atomic there already.

`atomic_write` is the one way a local file is replaced: readers see the old
content or the new, never half of it, also after a crash of the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec

from core.errors import StorageError

if TYPE_CHECKING:
    from core.encryption import Sealer

FILE_URL = "file://"
SEALED_MAGIC = b"ALSEAL1\n"  # the first bytes of a sealed file (core/encryption.py)


# ---- local paths ------------------------------------------------------------ #


def is_local(root: str) -> bool:
    """True for a local directory or a file:// URL; False for an object store (s3://, gs://, ...)."""
    return "://" not in root or root.startswith(FILE_URL)


def local_path(root: str) -> Path:
    """The directory of a local storage root (a StorageError for a remote one)."""
    if not is_local(root):
        raise StorageError(f"{root} is not a local directory")
    return Path(root.removeprefix(FILE_URL))


def inside_root(root: str, path: Path) -> bool:
    """True when `path` is the local storage root or lies under it (False for a remote root)."""
    if not is_local(root):
        return False
    base, where = os.path.realpath(local_path(root)), os.path.realpath(path)
    return where == base or where.startswith(base + os.sep)


def scratch_dir(prefix: str) -> tempfile.TemporaryDirectory:
    """A private (0700) temporary directory for files opened for one load: in memory (/dev/shm) where there is one."""
    shm = Path("/dev/shm")
    return tempfile.TemporaryDirectory(prefix=prefix, dir=str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """Replace `path` with `data`: temporary file, fsync, rename, fsync the directory.

    Private by default (0o600): what adaptloop writes is mostly about people,
    and the mode is set before the first byte, so the file is never readable
    by others, not even for an instant.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: Path, data: Any, mode: int = 0o600) -> Path:
    """`atomic_write` of `data` as indented, key-sorted JSON."""
    return atomic_write(path, json.dumps(data, indent=2, sort_keys=True).encode("utf-8"), mode)


def open_sealed(data: bytes, sealer: Sealer | None, where: str | Path) -> bytes:
    """`data` as it was written: sealed files opened, plain files as they are."""
    if not data.startswith(SEALED_MAGIC):
        return data
    if sealer is None:
        raise StorageError(f"{where} is encrypted: set storage.encryption.enabled and storage.encryption.keyring to read it")
    return sealer.open(data, str(where))


# ---- the store -------------------------------------------------------------- #


class ArtifactStore:
    """Files under one root. With a `sealer` (core/encryption.py, `open_store`) personal files are encrypted:
    `write_personal` seals, `read_bytes` opens whatever was sealed."""

    def __init__(self, root: str, sealer: Sealer | None = None) -> None:
        self.local = is_local(root)
        self.root = str(local_path(root).resolve()) if self.local else root.rstrip("/")
        self.fs = fsspec.filesystem("file") if self.local else fsspec.core.url_to_fs(self.root)[0]
        self.sealer = sealer

    # ---- paths ----------------------------------------------------------- #

    def path(self, relative: str) -> str:
        """The full path of `relative`, refusing anything that would leave the root."""
        if not relative or relative.startswith("/") or "\\" in relative or "\x00" in relative:
            raise StorageError(f"refusing artifact path {relative!r}")
        normal = posixpath.normpath(relative)
        if normal == ".." or normal.startswith("../") or normal == ".":
            raise StorageError(f"refusing artifact path {relative!r}: it leaves the storage root")
        full = f"{self.root}/{normal}"
        if self.local and not os.path.realpath(full).startswith(os.path.realpath(self.root) + os.sep):
            raise StorageError(f"refusing artifact path {relative!r}: it resolves outside the storage root")
        return full

    def uri(self, relative: str) -> str:
        full = self.path(relative)
        return f"{FILE_URL}{full}" if self.local else full

    def relative_from_uri(self, uri: str) -> str:
        """Inverse of `uri()`: the relative path of a URI inside this store."""
        prefix = f"{FILE_URL}{self.root}/" if self.local else f"{self.root}/"
        if not uri.startswith(prefix):
            raise StorageError(f"{uri} is not inside the storage root {self.root}")
        return uri[len(prefix) :]

    # ---- I/O -------------------------------------------------------------- #

    def write_bytes(self, relative: str, data: bytes) -> str:
        """Write atomically; return the URI."""
        full = self.path(relative)
        try:
            if self.local:
                atomic_write(Path(full), data)
            else:
                self.fs.makedirs(posixpath.dirname(full), exist_ok=True)
                with self.fs.open(full, "wb") as fh:
                    fh.write(data)
        except OSError as exc:
            raise StorageError(f"cannot write {full}: {exc}") from exc
        return self.uri(relative)

    def write_personal(self, relative: str, data: bytes, user_id: str | None) -> str:
        """`write_bytes` of data about `user_id` (None: several users), sealed for them when encryption is on."""
        return self.write_bytes(relative, self.personal_bytes(data, user_id))

    def personal_bytes(self, data: bytes, user_id: str | None, sha256: str | None = None) -> bytes:
        """What `write_personal` would write (sealed when encryption is on), to write to several files at once."""
        return self.sealer.seal(user_id, data, sha256) if self.sealer is not None else data

    def read_bytes(self, relative: str) -> bytes:
        """The file's content; a sealed file is opened (and refused when it was changed)."""
        full = self.path(relative)
        try:
            with self.fs.open(full, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            raise StorageError(f"artifact not found: {full}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {full}: {exc}") from exc
        return open_sealed(data, self.sealer, full)

    def exists(self, relative: str) -> bool:
        return bool(self.fs.exists(self.path(relative)))

    def list(self, relative_dir: str) -> list[str]:
        """Relative paths of the files directly inside `relative_dir` (sorted; [] if absent)."""
        full = self.path(relative_dir)
        try:
            entries = self.fs.ls(full, detail=False)
        except FileNotFoundError:
            return []
        base = full.rstrip("/") + "/"
        out = []
        for entry in entries:
            entry = str(entry)
            name = entry[len(base) :] if entry.startswith(base) else posixpath.basename(entry)
            if name and not name.startswith(".tmp-"):
                out.append(f"{relative_dir.rstrip('/')}/{name}")
        return sorted(out)

    def create_once(self, relative: str, data: bytes) -> bytes:
        """Write `data` unless the file exists; return what the file holds (the first writer wins).

        Local roots create the file exclusively (O_EXCL), so two processes
        racing get the same content; object stores check, then write.
        """
        full = self.path(relative)
        if not self.local:
            if not self.fs.exists(full):
                self.write_bytes(relative, data)
            return self.read_bytes(relative)
        Path(full).parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return self.read_bytes(relative)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(Path(full).parent)
        return data

    def remove(self, relative: str) -> bool:
        """Delete a file or a whole directory; False when there was nothing."""
        full = self.path(relative)
        try:
            if not self.fs.exists(full):
                return False
            self.fs.rm(full, recursive=True)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot delete {full}: {exc}") from exc
        return True
