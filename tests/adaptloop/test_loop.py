"""The whole loop on the tiny model (worker, trainer, API on one config): what a user meets from the outside.

A retrain with nothing to learn ends at once as `skipped`, with the reason,
and registers nothing; `status` (API and CLI) shows a job while it runs,
with its progress, and how it ended.

The loop runs with encryption at rest on, as the docker-compose example
does (every other test runs it off): worker -> trainer -> gate -> promote
(or, when the gate rejected v1, an operator's rollback to it) -> ask work
unchanged, no dataset, adapter or checkpoint lies on disk as JSON or
safetensors, and after a key rotation and the old key's retirement
everything still loads.
"""

from __future__ import annotations

from datetime import datetime

import httpx
import pytest

from core.encryption import MAGIC, Keyring, Sealer
from core.storage import ArtifactStore
from tests.support.events import event
from tests.support.stores import has_plain_magic
from trainer.registry import ADAPTER_FILES, AdapterRegistry

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _job(loop, job_id: str) -> dict:
    return httpx.get(f"{loop.url}/api/adapter/job/{job_id}", headers=loop.headers).json()


def _status(loop, user: str) -> dict:
    return httpx.get(f"{loop.url}/api/adapter/status/{user}", headers=loop.headers).json()


def _retrain(loop, user: str) -> str:
    accepted = httpx.post(f"{loop.url}/api/adapter/retrain", headers=loop.headers, json={"user_id": user, "include_global": True})
    assert accepted.status_code == 202, accepted.text
    return accepted.json()["job_id"]


def _ended(loop, job_id: str) -> dict | None:
    job = _job(loop, job_id)
    return job if job["status"] not in ("queued", "training", "gating", "validating") else None


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _took(job: dict) -> float:
    """From the command to the event that ended its job (timestamps of the API and the trainer, one machine)."""
    return _seconds(job["created_at"], job["events"][-1]["at"])


def test_nothing_to_learn_is_skipped_and_status_follows_a_running_job(loop_factory, tmp_path):
    # A long job by construction (no early stop, no time budget): status can be read while it runs.
    keyring = Keyring.create(tmp_path / "keyring.json").path
    loop = loop_factory(
        training={"epochs": 150, "early_stopping": False, "max_train_seconds": 0, "checkpoint_every": 20},
        min_gap_events=3,
        storage={"encryption": {"enabled": True, "keyring": str(keyring)}},
    )

    # A user with no events at all: skipped, with the reason, before any training; nothing registered.
    job_id = _retrain(loop, "nobody")
    nobody = loop.wait_for(lambda: _ended(loop, job_id), what="nobody's retrain to end")
    assert (nobody["status"], nobody["reason"]) == ("skipped", "no examples"), nobody
    lifecycle = [e for e in loop.lifecycle() if e["user_id"] == "nobody"]
    assert [e["type"] for e in lifecycle] == ["training_skipped"], "no training_started: nothing was trained"
    assert "training nobody:" not in loop.trainer.log()
    assert httpx.get(f"{loop.url}/api/adapter/history/nobody", headers=loop.headers).json() == []
    assert "skipped: no examples" in loop.cli("status", "nobody").stdout

    # sam's corrections cross the threshold: status shows the job training, with its progress.
    loop.publish([event("feedback", "sam", n) for n in range(3)])
    running = loop.wait_for(lambda: (_status(loop, "sam")["job"] or {}).get("progress"), what="sam's job training", interval=0.2)
    assert running["step"] < running["total"]
    checkpoint = loop.wait_for(lambda: _checkpoint_bytes(loop), what="sam's first checkpoint", interval=0.2)
    assert not has_plain_magic(checkpoint), "checkpoints are sealed too"
    shown = loop.cli("status", "sam").stdout
    assert "job: training (step" in shown and "trigger threshold" in shown, shown
    done = loop.wait_for(
        lambda: (lambda job: job if job and not job["open"] else None)(_status(loop, "sam")["job"]),
        timeout=600,
        what="sam's job to end",
    )
    assert done["state"] in ("promoted", "rejected") and done["version"] == 1, done
    assert f"job: {done['state']} v1, trigger threshold" in loop.cli("status", "sam").stdout
    trained_lines = loop.trainer.log().count("training sam:")

    # Nothing new since v1: a retrain is skipped and the history stays as it was.
    history = httpx.get(f"{loop.url}/api/adapter/history/sam", headers=loop.headers).json()
    job_id = _retrain(loop, "sam")
    again = loop.wait_for(lambda: _ended(loop, job_id), what="sam's retrain to end")
    assert (again["status"], again["reason"]) == ("skipped", "nothing new since v1"), again
    assert httpx.get(f"{loop.url}/api/adapter/history/sam", headers=loop.headers).json() == history
    assert loop.trainer.log().count("training sam:") == trained_lines, "no step of training for the skipped retrain"

    # Fast: a skip ends well within the time sam's one training run took (this machine's pace, whatever it is).
    sam = {e["type"]: e["timestamp"] for e in reversed(loop.lifecycle()) if e["user_id"] == "sam"}  # the first of each
    training = _seconds(sam["training_started"], sam["training_completed"])
    assert _took(nobody) < training / 2 and _took(again) < training / 2, (_took(nobody), _took(again), training)

    _sealed_at_rest_through_a_key_rotation(loop, keyring, done["state"])


def _checkpoint_bytes(loop) -> bytes | None:
    for path in (loop.store / "models/adapters/checkpoints").rglob("adapter.safetensors"):
        try:
            return path.read_bytes()
        except FileNotFoundError:  # swapped for the next one meanwhile
            pass
    return None


def _is_personal(path) -> bool:
    """Datasets (not their manifests: counts and hashes) and adapters' files; the logs carry ids and numbers only."""
    return ("/adapter_training/" in str(path) and path.suffix == ".jsonl") or path.name in ADAPTER_FILES


def _sealed_at_rest_through_a_key_rotation(loop, keyring, state: str) -> None:
    personal = [p for p in loop.store.rglob("*") if p.is_file() and _is_personal(p)]
    assert any(p.name.endswith(".safetensors") for p in personal) and any("user_sam" in p.name for p in personal)
    opened = [p for p in personal if has_plain_magic(p.read_bytes())]
    assert not opened, f"files in the clear: {opened}"
    if state == "rejected":  # the gate's verdict on the tiny model varies: v1 made active by the trainer, as an operator would
        rolled = loop.cli("rollback", "--user-id", "sam", "--reason", "serve v1 anyway", "--to-version", "1")
        assert rolled.returncode == 0, rolled.stderr
    answered = loop.cli("ask", "--user-id", "sam", "What is my dog's name?")  # the active version
    assert answered.returncode == 0 and "[sam v1]" in answered.stdout, answered.stderr

    old = Keyring(keyring).current
    rotated = loop.cli("keys", "rotate")
    assert rotated.returncode == 0 and "re-wrapped" in rotated.stdout, rotated.stderr
    retired = loop.cli("keys", "retire", old)
    assert retired.returncode == 0 and Keyring(keyring).ids() == [Keyring(keyring).current] != [old], retired.stderr
    # Everything still opens with the rotated keyring alone, as a freshly started process reads it.
    store = ArtifactStore(str(loop.store), Sealer(ArtifactStore(str(loop.store)), Keyring(keyring)))
    opened = {p: store.read_bytes(str(p.relative_to(loop.store))) for p in personal}
    assert all(not data.startswith(MAGIC) for data in opened.values()) and len(opened) == len(personal)
    registry = AdapterRegistry(loop.store, sealer=store.sealer)
    assert registry.files(registry.verify("sam", 1)), "v1 opens and every sha256 holds"
