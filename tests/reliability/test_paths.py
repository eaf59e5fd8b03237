"""No `user_id` accepted anywhere resolves outside the storage root (a hypothesis property test).

Every place that builds a path from a user_id is tried with ids hypothesis
makes up, biased towards the dangerous ones (dots, slashes, percent-escapes,
unicode look-alikes, NUL): either the id is refused everywhere with a clear
error, or every path built from it lies inside the root, one level below its
folder.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from core.errors import StorageError
from core.storage import ArtifactStore
from schemas.common import UserId, check_user_id
from streams.dataset import write_dataset
from trainer.job import user_cases
from trainer.registry import AdapterRegistry

pytestmark = pytest.mark.unit

PIECES = [
    "..",
    ".",
    "/",
    "\\",
    "%2e",
    "%2f",
    "~",
    "\x00",
    "\u2024",
    "\uff0e",
    "\u2215",
    "\u2044",
    "@",
    "-",
    "_",
    "a",
    "Z",
    "9",
    "..%2f",
    "%00",
    " ",
    "\n",
    "con",
    "nul",
    "etc",
    "passwd",
]
user_ids = st.one_of(
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=12).map("".join),
    st.from_regex(r"\A[A-Za-z0-9@_.\-]{1,130}\Z"),
    st.text(max_size=140),
)


class _Event(BaseModel):
    user_id: UserId


def _inside(path: str | Path, folder: Path) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


def test_no_accepted_user_id_leaves_the_storage_root(tmp_path, figures):
    root = tmp_path / "storage"
    registry = AdapterRegistry(root)
    store = ArtifactStore(str(root))
    tried: Counter[str] = Counter()

    @settings(max_examples=2000, deadline=None, database=None)
    @given(user_id=user_ids)
    def check(user_id):
        try:
            check_user_id(user_id)
        except ValueError:
            tried["refused"] += 1
            with pytest.raises(ValidationError):
                _Event(user_id=user_id)
            with pytest.raises((StorageError, ValueError)):
                registry.user_dir(user_id)
            return
        tried["accepted"] += 1
        assert _Event(user_id=user_id).user_id == user_id
        user_dir = registry.user_dir(user_id)
        users = registry.root / "users"
        assert _inside(user_dir, users) and user_dir.parent == users.resolve(), "one folder per user, directly under users/"
        assert _inside(registry.version_dir(user_id, 3), user_dir)
        assert registry.versions(user_id) == [] and registry.active(user_id) is None
        assert user_cases(store, "tests/users", user_id) == []
        for relative in (
            f"training/versions/user_{user_id}/x.jsonl",
            f"training/user_{user_id}_finetune.jsonl",
            f"tests/users/user_{user_id}.jsonl",
        ):
            assert _inside(store.path(relative), root)

    check()
    figures(
        "Bad input",
        "user_id paths (hypothesis property test)",
        f"{sum(tried.values())} made-up user_ids (dots, slashes, escapes, look-alikes, NUL)",
        lost=None,
        duplicated=None,
        result=f"{tried['refused']} refused everywhere; for the {tried['accepted']} accepted, every path built "
        "from them lies inside the storage root, one folder per user",
    )
    assert tried["refused"] > 100 and tried["accepted"] > 100, "both sides of the rule were tried"


def test_writing_a_dataset_for_an_odd_but_valid_user_stays_inside(tmp_path):
    from schemas.training import TrainingExample

    store = ArtifactStore(str(tmp_path / "store"))
    for user_id in (".a", "a.", ".a.b", "-", "@", "_", "a.b.c"):
        check_user_id(user_id)
        ref = write_dataset(store, user_id, [TrainingExample(prompt="p", response="r")], [], trigger="manual", lineage_ranges=[])
        assert _inside(ref.uri.removeprefix("file://"), tmp_path / "store")
    written = [p for p in (tmp_path).rglob("*") if p.is_file()]
    assert written and all(_inside(p, tmp_path / "store") for p in written)
