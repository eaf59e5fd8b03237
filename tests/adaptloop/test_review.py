"""`adaptloop review` offline: a version trained with `adaptloop train` in review mode waits, then is approved or denied."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from adaptloop.cli import cli
from tests.support.adapters import FACTS, write_facts
from trainer.registry import AdapterRegistry

pytestmark = pytest.mark.unit

REVIEW_MODE = {"ADAPTLOOP_PROMOTION__MODE": "review"}  # the contract's environment name


@pytest.fixture
def config(tmp_path, tiny_model_dir):
    """The tiny model, with a gate every candidate passes: what is tested here is what happens after the gate."""
    path = tmp_path / "adapter_retrain.yaml"
    settings = {
        "storage_root": str(tmp_path / "store"),
        "cache_dir": str(tmp_path / "cache"),
        "promote_if_score": 0.0,
        "regression_threshold": 1.0,
        "model": {"base_model": str(tiny_model_dir), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8},
        "training": {"epochs": 1, "batch_size": 4, "anchors": False},
        "validation": {"min_retention": 0.0, "max_forgetting": 1.0},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def _run(config, *args: str, env: dict | None = None):
    return CliRunner().invoke(cli, ["--config", str(config), *args], env=env)


def _train(config, tmp_path, n: int, env: dict | None = REVIEW_MODE):
    data = write_facts(tmp_path / f"ann-{n}.jsonl", FACTS[n - 1 : n + 1])  # new facts each time, each with paraphrases
    result = _run(config, "train", "--user-id", "ann", "--data-path", str(data), env=env)
    assert result.exit_code == 0, result.output
    return result.output


def test_train_in_review_mode_waits_and_review_commands_approve_deny_and_set_a_users_mode(config, tmp_path):
    registry = AdapterRegistry(tmp_path / "store")
    output = _train(config, tmp_path, 1)
    (review,) = registry.reviews("ann")
    assert f"v1 passed and awaits review {review.review_id}" in output and registry.active("ann") is None

    status = _run(config, "status", "ann", "--no-job").output
    assert f"v1 awaits review {review.review_id}" in status and "active version (none: base model)" in status
    listed = _run(config, "review", "list").output.splitlines()
    assert len(listed) == 1 and listed[0].split()[:3] == [review.review_id, "ann", "v1"], "ID first, then user and version"
    shown = _run(config, "review", "show", review.review_id)
    assert shown.exit_code == 0 and "user suite:" in shown.output and "before:" in shown.output, shown.output
    details = json.loads(_run(config, "review", "show", review.review_id, "--json").output)
    assert details["user_cases"] and all("before" in case for case in details["user_cases"]), "the reference's answers"

    approved = _run(config, "review", "approve", review.review_id, "--direct", "--reason", "fine")
    assert approved.exit_code == 0 and "ann v1: approved, now active" in approved.output
    assert registry.active("ann") == 1 and registry.review(review.review_id).decided_by == "cli --direct"
    again = _run(config, "review", "approve", review.review_id, "--direct")
    assert again.exit_code == 1 and "already approved" in again.output

    _train(config, tmp_path, 2)
    pending = [r for r in registry.reviews("ann") if r.pending]
    assert [r.version for r in pending] == [2]
    denied = _run(config, "review", "deny", pending[0].review_id, "--direct", "--reason", "answers are wrong")
    assert denied.exit_code == 0 and registry.active("ann") == 1, denied.output
    assert (
        _run(config, "review", "list").output.strip() == "no pending reviews"
        and "denied by cli --direct: answers are wrong" in _run(config, "review", "list", "--all").output
    )

    assert "ann: promotion mode auto" in _run(config, "review", "mode", "ann", "auto").output
    assert "v3 promoted" in _train(config, tmp_path, 3), "the user's own mode wins over the environment's"
    assert registry.active("ann") == 3


def test_review_commands_refuse_unknown_ids_and_a_deny_without_reason(config):
    result = _run(config, "review", "show", "r-0123456789ab")
    assert result.exit_code == 2 and "no review r-0123456789ab" in result.output
    result = _run(config, "review", "deny", "r-0123456789ab", "--direct")
    assert result.exit_code == 2 and "--reason" in result.output
    result = _run(config, "review", "mode", "ann", "sometimes")
    assert result.exit_code == 2 and "sometimes" in result.output
