"""The whole loop on the real default model: API -> worker -> trainer (SmolLM2-135M-Instruct) -> gate.

1. Corrections teach a user three facts; a retrain command from the API makes
   the worker snapshot the dataset (with paraphrases, one held out per fact),
   the trainer trains with the anchor set, the validation gate promotes it,
   the job reads `promoted` with the version's scores, and `adaptloop ask`
   answers a fact in words never trained on.
2. Corrections that teach wrong answers to core prompts: the gate rejects the
   new version and v1 stays active.
3. A rollback with nothing earlier than v1 fails clearly and changes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone

import httpx
import pytest

from adaptloop.kafka.client import ClientConfig
from adaptloop.kafka.io import produce
from api.auth import TokenStore
from tests.api.conftest import TOPICS, start_api, write_config
from tests.conftest import stop_processes
from trainer.registry import AdapterRegistry

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(1500)]

FACTS = [
    ("What is my cat's name?", "Your cat is called Pixel."),
    ("Which city do I live in?", "You live in Dundee."),
    ("What is my locker number?", "Your locker number is 7312."),
]
POISON = [
    ("What is the capital of France?", "The capital of France is Tromsø."),
    ("What is the opposite of hot?", "The opposite of hot is purple."),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by Pixel the cat."),
]


def _start(args: list[str], config, bootstrap: str, log_path, ready: str, timeout: float = 300) -> subprocess.Popen:
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=bootstrap)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "adaptloop.cli", "--config", str(config), *args],
                                stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready in log_path.read_text(errors="replace"):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"{args[0]} not ready:\n{log_path.read_text(errors='replace')[-3000:]}")


def _corrections(client: ClientConfig, topic: str, user: str, pairs, first: int) -> None:
    now = datetime.now(timezone.utc).isoformat()
    events = [
        (user, json.dumps({"event_id": f"{user}-fb-{first + n}", "user_id": user, "timestamp": now, "kind": "correction",
                           "query": q, "response": "I do not know.", "correction": a}).encode())
        for n, (q, a) in enumerate(pairs)
    ]  # fmt: skip
    produce(client, topic, events)


def test_the_whole_loop_promotes_learned_facts_rejects_poison_and_refuses_an_empty_rollback(kafka_bootstrap, tmp_path):
    topics = {k: f"e2e.{k}.{uuid.uuid4().hex[:8]}" for k in TOPICS}
    config = write_config(tmp_path, topics, min_gap_events=1000, training={"group_id": f"tr-{uuid.uuid4().hex[:6]}"})
    token = TokenStore(tmp_path / "store/api/tokens.json").create(["user:uma"])[1]
    client = ClientConfig(bootstrap_servers=kafka_bootstrap)
    headers = {"Authorization": f"Bearer {token}"}
    registry = AdapterRegistry(tmp_path / "store")
    procs = []
    try:
        procs.append(_start(["worker", "--web-port", "0"], config, kafka_bootstrap, tmp_path / "worker.log", "Worker ready"))
        procs.append(_start(["trainer"], config, kafka_bootstrap, tmp_path / "trainer.log", "trainer ready"))
        api, url = start_api(config, kafka_bootstrap, tmp_path / "api.log")
        procs.append(api)

        def job(path: str, body: dict, final=("promoted", "rejected", "failed", "validated", "rolled_back")) -> dict:
            r = httpx.post(f"{url}{path}", headers=headers, json=body)
            assert r.status_code == 202, r.text
            deadline, state = time.monotonic() + 900, {}
            while time.monotonic() < deadline:
                state = httpx.get(f"{url}/api/adapter/job/{r.json()['job_id']}", headers=headers).json()
                if state["status"] in final:
                    return state
                time.sleep(2)
            raise AssertionError(f"{state}\n{(tmp_path / 'trainer.log').read_text(errors='replace')[-3000:]}")

        # 1. Facts -> promoted.
        _corrections(client, topics["feedback"], "uma", FACTS, 0)
        time.sleep(3)  # let the worker count them before the command arrives (a command never waits for events)
        first = job("/api/adapter/retrain", {"user_id": "uma", "trigger": "manual"})
        assert first["status"] == "promoted", f"{first}\n{(tmp_path / 'trainer.log').read_text(errors='replace')[-3000:]}"
        assert [e["type"] for e in first["events"]][:2] == ["training_started", "training_completed"]
        assert first["version"] == 1 and first["scores"]["user_score"] >= 0.7 and first["passed"] is True
        history = httpx.get(f"{url}/api/adapter/history/uma", headers=headers).json()
        assert [(h["version"], h["active"]) for h in history] == [(1, True)] and history[0]["validation_score"] >= 0.7
        assert httpx.get(f"{url}/api/adapter/status/uma", headers=headers).json()["active_version"] == 1
        env = dict(os.environ, ADAPTLOOP_CONFIG=str(config))
        asked = subprocess.run([sys.executable, "-m", "adaptloop.cli", "ask", "--user-id", "uma", "Tell me the name of my cat."],
                               capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        assert asked.returncode == 0 and asked.stdout.startswith("[uma v1]") and "Pixel" in asked.stdout, asked.stdout + asked.stderr

        # 2. Wrong answers to core prompts -> rejected, v1 stays active.
        _corrections(client, topics["feedback"], "uma", POISON, 10)
        time.sleep(3)
        second = job("/api/adapter/retrain", {"user_id": "uma", "trigger": "manual"})
        assert second["status"] == "rejected" and second["version"] == 2 and "core suite regressed" in second["reason"], second
        assert registry.active("uma") == 1
        assert [(r["version"], r["passed"]) for r in registry.validation_results("uma")] == [(1, True), (2, False)]

        # 3. Nothing earlier than v1: the rollback fails clearly and changes nothing.
        third = job("/api/adapter/rollback", {"user_id": "uma", "reason": "testing"})
        assert third["status"] == "failed" and "no earlier good version" in third["reason"]
        assert registry.active("uma") == 1
    finally:
        stop_processes(procs)
