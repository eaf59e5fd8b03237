"""Review mode through Kafka: a trainer holds passed candidates for review; approve, deny, supersede and timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from core.kafka.io import produce
from schemas import ApproveCommand, DenyCommand, TrainingExample
from trainer.registry import AdapterRegistry

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

# Every candidate passes this gate: what is tested is what happens after it.
REVIEWED = {
    "promote_if_score": 0.0,
    "regression_threshold": 1.0,
    "validation": {"min_retention": 0.0, "max_forgetting": 1.0},
    "promotion": {"mode": "review"},
    "review": {"timeout_h": 24, "on_timeout": "deny", "check_every_s": 0.5},
}


def _examples(tag: str) -> tuple[list[TrainingExample], list[TrainingExample]]:
    train = [
        TrainingExample(prompt=f"What is {tag} code {i}?", response=f"Code {i} is {tag}.", event_id=f"{tag}{i}") for i in range(2)
    ]
    return train, [TrainingExample(prompt=f"Tell me {tag} code 0.", response=f"Code 0 is {tag}.", event_id=f"{tag}0")]


def test_review_mode_end_to_end_approve_deny_supersede_and_timeout(trainer_factory):
    t = trainer_factory(epochs=1, settings=REVIEWED)
    registry = AdapterRegistry(t.store)

    def train(tag: str) -> dict:
        request = t.request("ann", *_examples(tag))
        t.publish(request)
        done = t.wait_for(
            lambda: [e for e in t.lifecycle() if e.get("request_id") == request.request_id and e["type"] == "awaiting_review"],
            what=f"{tag}'s version to await review",
        )
        return done[0]

    def answered(command_id: str, kind: str) -> dict:
        return t.wait_for(lambda: [e for e in t.lifecycle() if e.get("job_id") == command_id and e["type"] == kind])[0]

    first = train("alpha")
    review_id = first["details"]["review_id"]
    assert first["version"] == 1 and registry.active("ann") is None, "nothing reaches the user before a person approves"

    # A person approves with the CLI, which sends the command and waits for the trainer's answer.
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=t.client.bootstrap_servers)
    args = [sys.executable, "-m", "adaptloop.cli", "--config", str(t.config), "review", "approve", review_id]
    cli = subprocess.run(args, capture_output=True, text=True, env=env, timeout=180)
    assert cli.returncode == 0 and "ann v1: approved, now active" in cli.stdout, cli.stderr
    assert registry.active("ann") == 1
    kinds = [e["type"] for e in t.lifecycle() if e.get("details", {}).get("review_id") == review_id]
    assert kinds == ["awaiting_review", "approved", "promoted"], "servers and the worker follow the `promoted` event"
    assert registry.review(review_id).decided_by == "cli"

    second, third = train("beta"), train("gamma")
    superseded = t.wait_for(
        lambda: [
            e for e in t.lifecycle() if e["type"] == "denied" and e["details"]["review_id"] == second["details"]["review_id"]
        ]
    )[0]
    assert superseded["details"]["superseded_by"] == 3 and superseded["version"] == 2

    deny = DenyCommand(command_id="deny-1", user_id="ann", review_id=third["details"]["review_id"], reason="wrong tone")
    produce(t.client, t.topics["commands"], [("ann", deny.to_bytes())])
    denied = answered("deny-1", "denied")
    assert (denied["version"], denied["reason"]) == (3, "wrong tone") and registry.active("ann") == 1
    late = ApproveCommand(command_id="approve-late", user_id="ann", review_id=third["details"]["review_id"])
    produce(t.client, t.topics["commands"], [("ann", late.to_bytes())])
    assert "already denied" in answered("approve-late", "command_failed")["reason"]

    fourth = train("delta")
    pending = registry.review(fourth["details"]["review_id"])
    registry.record_review(pending.model_copy(update={"opened_at": datetime.now(UTC) - timedelta(hours=25)}))  # a day ago
    expired = t.wait_for(
        lambda: [e for e in t.lifecycle() if e["type"] == "denied" and e["details"]["review_id"] == pending.review_id],
        what="the overdue review to be denied",
    )[0]
    assert expired["details"]["decided_by"] == "timeout" and "review.on_timeout: deny" in expired["reason"]
    statuses = {r.version: r.status for r in registry.reviews("ann")}
    assert registry.active("ann") == 1 and statuses == {1: "approved", 2: "denied", 3: "denied", 4: "denied"}
