"""The artifact store: atomic writes, listing, and no path outside the root."""

from __future__ import annotations

import pytest

from core.errors import StorageError
from core.storage import ArtifactStore

pytestmark = pytest.mark.unit


def test_write_read_list(tmp_path):
    store = ArtifactStore(str(tmp_path))
    uri = store.write_bytes("a/b/c.txt", b"hello")
    assert uri == f"file://{tmp_path}/a/b/c.txt"
    assert store.read_bytes("a/b/c.txt") == b"hello"
    assert store.relative_from_uri(uri) == "a/b/c.txt"
    assert store.list("a/b") == ["a/b/c.txt"] and store.list("nothing") == []
    assert not list(tmp_path.glob("a/b/.tmp-*"))


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "a\\..\\b", "", ".", "a/\x00"])
def test_paths_outside_the_root_are_refused(tmp_path, bad):
    store = ArtifactStore(str(tmp_path / "root"))
    with pytest.raises(StorageError):
        store.write_bytes(bad, b"x")
    assert not (tmp_path / "x").exists()


def test_symlink_escape_is_refused(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    store = ArtifactStore(str(tmp_path / "root"))
    with pytest.raises(StorageError, match="outside"):
        store.write_bytes("link/escape.txt", b"x")


def test_missing_artifact_is_a_clear_error(tmp_path):
    with pytest.raises(StorageError, match="not found"):
        ArtifactStore(str(tmp_path)).read_bytes("nope.jsonl")


def test_fsspec_memory_url():
    store = ArtifactStore("memory://adaptloop-test")
    uri = store.write_bytes("d/x.jsonl", b"1\n")
    assert store.read_bytes(store.relative_from_uri(uri)) == b"1\n"
    assert store.list("d") == ["d/x.jsonl"]
