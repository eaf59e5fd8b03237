"""`adaptloop export`: everything held about one user, nothing about anyone else, each part described."""

from __future__ import annotations

import json

import pytest

from core.errors import AdaptloopError
from core.settings import Settings
from core.storage import file_sha256
from privacy.export import ExportConfig, WorkerHoldings, export_user
from tests.support.stores import seed_user, user_example

pytestmark = pytest.mark.unit


def test_an_export_holds_every_part_of_one_user_and_nothing_of_another(tmp_path):
    settings = ExportConfig.from_settings(
        Settings.model_validate({"storage_root": str(tmp_path / "store"), "max_adapter_versions": 2})
    )
    seed_user(tmp_path, "ana", versions=3)
    seed_user(tmp_path, "ben", versions=1)
    held = WorkerHoldings(state={"events_total": 12, "training_consent": True}, pending=[user_example(50, "ana")])
    out = tmp_path / "export"
    index = export_user(settings, "ana", out, held)

    paths = {p.path for p in index.parts}
    assert {"history.json", "validation_results.jsonl", "rollbacks.jsonl", "audit.jsonl", "lineage.json"} <= paths
    assert {"pending_examples.jsonl", "worker_state.json", "user_tests.jsonl"} <= paths
    assert {"adapters/v2/", "adapters/v3/", "adapters/archive/v1/"} <= paths, "kept and archived versions"
    assert len([p for p in paths if p.startswith("datasets/")]) == 9, "3 datasets: examples, held-out, manifest each"
    for version in ("v2", "v3"):
        kept = json.loads((out / "adapters" / version / "manifest.json").read_text())
        assert file_sha256(out / "adapters" / version / "adapter_model.safetensors") == kept["files"]["adapter_model.safetensors"]
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["v3"] == [{"topic": "interactions.feedback", "partition": 0, "first_offset": 30, "last_offset": 34}]
    assert [json.loads(line)["user_id"] for line in (out / "rollbacks.jsonl").read_text().splitlines()] == ["ana"]
    assert "ana question 50?" in (out / "pending_examples.jsonl").read_text()
    assert json.loads((out / "worker_state.json").read_text())["events_total"] == 12
    on_disk = json.loads((out / "export.json").read_text())
    assert on_disk["user_id"] == "ana" and {p["path"] for p in on_disk["parts"]} == paths
    readme = (out / "README.md").read_text()
    assert all(f"`{p}`" in readme for p in paths)
    everything = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert b"ben" not in everything, "another user's data"


def test_an_export_needs_an_empty_directory_and_says_what_it_left_out(tmp_path):
    settings = ExportConfig.from_settings(Settings.model_validate({"storage_root": str(tmp_path / "store")}))
    seed_user(tmp_path, "ana", versions=1)
    index = export_user(settings, "ana", tmp_path / "out", None)
    assert index.not_included and "worker" in (tmp_path / "out" / "README.md").read_text().split("Not included:")[1]
    with pytest.raises(AdaptloopError, match="not empty"):
        export_user(settings, "ana", tmp_path / "out", None)


def test_the_command_line_writes_the_export_and_refuses_a_used_directory(tmp_path):
    import yaml

    from tests.support.processes import run_cli

    seed_user(tmp_path, "ana", versions=1)
    config = tmp_path / "adapter_retrain.yaml"
    config.write_text(yaml.safe_dump({"storage_root": str(tmp_path / "store")}))
    done = run_cli("--config", str(config), "export", "ana", "--out", str(tmp_path / "out"), "--no-worker-state")
    assert done.returncode == 0 and "parts written" in done.stdout, done.stderr
    assert json.loads((tmp_path / "out" / "export.json").read_text())["user_id"] == "ana"
    again = run_cli("--config", str(config), "export", "ana", "--out", str(tmp_path / "out"), "--no-worker-state")
    assert again.returncode == 2 and "not empty" in again.stderr
    bad = run_cli("--config", str(config), "export", "../x", "--out", str(tmp_path / "o2"), "--no-worker-state")
    assert bad.returncode == 2 and "USER_ID" in bad.stderr
