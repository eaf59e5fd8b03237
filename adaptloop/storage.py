"""The artifact store: a local directory by default, any fsspec URL by config.

Every path handed in is relative to the root and is checked to stay inside it,
so nothing a client sends (a user_id, a version) can reach outside the root.
Local writes are atomic (temporary file, fsync, rename); remote object stores
write whole objects, which is atomic there already.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
from pathlib import Path

import fsspec

from adaptloop.errors import StorageError


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") if "://" in root else str(Path(root).resolve())
        self.local = "://" not in root or root.startswith("file://")
        if root.startswith("file://"):
            self.root = str(Path(root[len("file://") :]).resolve())
        self.fs, _ = fsspec.core.url_to_fs(self.root) if not self.local else (fsspec.filesystem("file"), None)

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
        return f"file://{full}" if self.local else full

    def relative_from_uri(self, uri: str) -> str:
        """Inverse of `uri()`: the relative path of a URI inside this store."""
        prefix = f"file://{self.root}/" if self.local else f"{self.root}/"
        if not uri.startswith(prefix):
            raise StorageError(f"{uri} is not inside the storage root {self.root}")
        return uri[len(prefix) :]

    # ---- I/O -------------------------------------------------------------- #

    def write_bytes(self, relative: str, data: bytes) -> str:
        """Write atomically; return the URI."""
        full = self.path(relative)
        try:
            if self.local:
                directory = os.path.dirname(full)
                os.makedirs(directory, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
                try:
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(data)
                        fh.flush()
                        os.fsync(fh.fileno())
                    os.replace(tmp, full)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
            else:
                self.fs.makedirs(posixpath.dirname(full), exist_ok=True)
                with self.fs.open(full, "wb") as fh:
                    fh.write(data)
        except OSError as exc:
            raise StorageError(f"cannot write {full}: {exc}") from exc
        return self.uri(relative)

    def read_bytes(self, relative: str) -> bytes:
        full = self.path(relative)
        try:
            with self.fs.open(full, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise StorageError(f"artifact not found: {full}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {full}: {exc}") from exc

    def exists(self, relative: str) -> bool:
        return bool(self.fs.exists(self.path(relative)))

    def list(self, relative_dir: str) -> list[str]:
        """Relative paths of the files directly inside `relative_dir` (sorted; [] if absent)."""
        full = self.path(relative_dir)
        try:
            entries = self.fs.ls(full, detail=False)
        except FileNotFoundError:
            return []
        base = self.path(relative_dir).rstrip("/") + "/"
        out = []
        for entry in entries:
            entry = str(entry)
            name = entry[len(base) :] if entry.startswith(base) else posixpath.basename(entry)
            if name and not name.startswith(".tmp-"):
                out.append(f"{relative_dir.rstrip('/')}/{name}")
        return sorted(out)
