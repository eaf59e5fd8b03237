"""The whole loop on the tiny model (worker, trainer, API on one config): what a user meets from the outside.

A retrain with nothing to learn ends at once as `skipped`, with the reason,
and registers nothing; `status` (API and CLI) shows a job while it runs,
with its progress, and how it ended.
"""

from __future__ import annotations

from datetime import datetime

import httpx
import pytest

from tests.support.events import event

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


def test_nothing_to_learn_is_skipped_and_status_follows_a_running_job(loop_factory):
    # A long job by construction (no early stop, no time budget): status can be read while it runs.
    loop = loop_factory(
        training={"epochs": 150, "early_stopping": False, "max_train_seconds": 0, "checkpoint_every": 0}, min_gap_events=3
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
