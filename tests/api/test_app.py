"""The HTTP API against the real broker and a real registry, served by a live `adaptloop api` process."""

from __future__ import annotations

import io
import json
import zipfile

import httpx
import pytest

from tests.support.adapters import fake_adapter, manifest
from tests.support.handles import ApiHandle
from tests.support.prometheus import check_metric_names
from trainer.registry import AdapterRegistry

pytestmark = pytest.mark.kafka


def _seed_registry(handle: ApiHandle, tmp_path) -> AdapterRegistry:
    registry = AdapterRegistry(handle.store)
    for version, score in ((1, 0.8), (2, 0.9)):
        registry.register(
            "alice",
            fake_adapter(tmp_path, f"a{version}", f"w{version}".encode()),
            manifest(
                request_id=f"r{version}",
                trigger="threshold",
                trained_at=f"2026-11-2{version}T10:00:00+00:00",
                metrics={"user_score": score, "core_score": 0.6, "facts_learned": 1.0, "train_seconds": 30.0},
                validation={"passed": True, "reasons": [], "suites": {}},
            ),
        )
        registry.activate("alice", version, reason="passed the validation gate")
    return registry


def test_health_needs_no_token_and_everything_else_does(api_server: ApiHandle):
    assert httpx.get(f"{api_server.url}/healthz").json()["status"] == "ok"
    for method, path in (
        ("get", "/api/adapter/status/alice"),
        ("get", "/api/adapter/history/alice"),
        ("get", "/metrics"),
        ("get", "/api/adapter/metrics"),
        ("get", "/api/adapter/job/job-x"),
        ("post", "/api/adapter/retrain"),
    ):
        for headers in ({}, {"Authorization": "Bearer al_nope_nope"}, {"Authorization": "Basic abc"}):
            r = httpx.request(method, f"{api_server.url}{path}", headers=headers, json={"user_id": "alice"})
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"] == "a valid bearer token is required" and r.headers["www-authenticate"] == "Bearer"


def test_scopes_403_validation_422_and_bounded_bodies(api_server: ApiHandle):
    alice = api_server.headers("alice")
    assert httpx.get(f"{api_server.url}/api/adapter/status/bob", headers=alice).status_code == 403
    r = httpx.post(f"{api_server.url}/api/adapter/retrain", headers=alice, json={"user_id": "bob"})
    assert r.status_code == 403 and "bob" in r.json()["error"]
    assert httpx.get(f"{api_server.url}/api/adapter/metrics", headers=alice).status_code == 403, "cross-user numbers are admin's"
    admin = api_server.headers()
    for body in (
        {"user_id": "../etc"},
        {"user_id": "a b"},
        {},
        {"user_id": "alice", "extra": 1},
        {"user_id": "alice", "include_global": "maybe"},
    ):
        r = httpx.post(f"{api_server.url}/api/adapter/retrain", headers=admin, json=body)
        assert r.status_code == 422 and r.json()["error"] == "invalid request", body
    assert httpx.post(f"{api_server.url}/api/adapter/rollback", headers=admin, json={"user_id": "alice"}).status_code == 422
    assert (
        httpx.post(f"{api_server.url}/api/adapter/validate", headers=admin, json={"user_id": "alice", "version": 0}).status_code
        == 422
    )
    for user in ("..", "a%2Fb", "%2E%2E"):
        r = httpx.get(f"{api_server.url}/api/adapter/history/{user}", headers=admin)
        assert r.status_code in (404, 422) and "error" in r.json(), user
    huge = httpx.post(
        f"{api_server.url}/api/adapter/rollback",
        headers=admin,
        content=json.dumps({"user_id": "alice", "reason": "x" * 100_000}),
        timeout=10,
    )
    assert huge.status_code == 413 and "larger than" in huge.json()["error"]
    bad_json = httpx.post(
        f"{api_server.url}/api/adapter/retrain", headers={**admin, "content-type": "application/json"}, content=b"{"
    )
    assert bad_json.status_code == 422
    assert not (api_server.store.parent / "etc").exists()


def test_commands_become_jobs_that_follow_the_lifecycle(api_server: ApiHandle):
    admin = api_server.headers()
    r = httpx.post(
        f"{api_server.url}/api/adapter/retrain",
        headers=api_server.headers("alice"),
        json={"user_id": "alice", "trigger": "manual", "include_global": True},
    )
    assert r.status_code == 202
    job_id = r.json()["job_id"]
    (command,) = [c for c in api_server.commands() if c["command_id"] == job_id]
    assert command["type"] == "retrain" and command["user_id"] == "alice" and command["include_global"] is True
    job = httpx.get(f"{api_server.url}/api/adapter/job/{job_id}", headers=admin).json()
    assert job["status"] == "queued" and job["kind"] == "retrain" and job["created_at"]

    def status() -> str:
        return httpx.get(f"{api_server.url}/api/adapter/job/{job_id}", headers=admin).json()["status"]

    api_server.lifecycle(type="training_started", user_id="alice", job_id=job_id, request_id="ab" * 8)
    api_server.wait_for(lambda: status() == "training", what="training")
    api_server.lifecycle(type="training_completed", user_id="alice", job_id=job_id, version=3, metrics={"final_loss": 0.1})
    api_server.wait_for(lambda: status() == "validating", what="validating")
    api_server.lifecycle(
        type="promoted",
        user_id="alice",
        job_id=job_id,
        version=3,
        metrics={"user_score": 0.91, "core_score": 0.6, "final_loss": 0.1},
        details={"passed": True},
    )
    api_server.wait_for(lambda: status() == "promoted", what="promoted")
    done = httpx.get(f"{api_server.url}/api/adapter/job/{job_id}", headers=admin).json()
    assert done["version"] == 3 and done["scores"] == {"user_score": 0.91, "core_score": 0.6} and done["passed"] is True
    assert [e["type"] for e in done["events"]] == ["training_started", "training_completed", "promoted"]
    assert httpx.get(f"{api_server.url}/api/adapter/job/job-unknown", headers=admin).status_code == 404
    # Alice's own token reads her job.
    assert httpx.get(f"{api_server.url}/api/adapter/job/{job_id}", headers=api_server.headers("alice")).status_code == 200

    v = httpx.post(
        f"{api_server.url}/api/adapter/validate", headers=admin, json={"user_id": "alice", "version": 2, "baseline_version": 1}
    )
    rb = httpx.post(
        f"{api_server.url}/api/adapter/rollback",
        headers=admin,
        json={"user_id": "alice", "reason": "complaints", "to_version": 1},
    )
    assert v.status_code == rb.status_code == 202
    commands = {c["command_id"]: c for c in api_server.commands()}
    assert commands[v.json()["job_id"]]["type"] == "validate" and commands[v.json()["job_id"]]["baseline_version"] == 1
    assert commands[rb.json()["job_id"]]["reason"] == "complaints" and commands[rb.json()["job_id"]]["to_version"] == 1
    api_server.lifecycle(type="command_failed", user_id="alice", job_id=rb.json()["job_id"], reason="alice has no kept version 1")
    failed = api_server.wait_for(
        lambda: (lambda j: j if j["status"] == "failed" else None)(
            httpx.get(f"{api_server.url}/api/adapter/job/{rb.json()['job_id']}", headers=admin).json()
        ),
        what="failed rollback",
    )
    assert failed["reason"] == "alice has no kept version 1"

    # Consent: the user's own token (or admin) sends the choice to the worker; no job, no other user's choice.
    r = httpx.put(f"{api_server.url}/api/adapter/users/alice/consent", headers=api_server.headers("alice"), json={"train": False})
    assert r.status_code == 202 and r.json()["train"] is False
    (sent,) = [c for c in api_server.commands() if c["command_id"] == r.json()["command_id"]]
    assert sent["type"] == "consent" and sent["user_id"] == "alice" and sent["train"] is False
    assert httpx.get(f"{api_server.url}/api/adapter/job/{sent['command_id']}", headers=admin).status_code == 404
    assert (
        httpx.put(
            f"{api_server.url}/api/adapter/users/bob/consent", headers=api_server.headers("alice"), json={"train": True}
        ).status_code
        == 403
    )
    assert httpx.put(f"{api_server.url}/api/adapter/users/alice/consent", headers=admin, json={"train": "no"}).status_code == 422


def test_status_history_and_metrics_come_from_the_registry(api_server: ApiHandle, tmp_path):
    _seed_registry(api_server, tmp_path)
    admin = api_server.headers()
    status = httpx.get(f"{api_server.url}/api/adapter/status/alice", headers=api_server.headers("alice")).json()
    assert status["active_version"] == 2 and status["validation_score"] == 0.9 and status["last_training"]["version"] == 2
    assert status["pending_gaps"] == 0
    history = httpx.get(f"{api_server.url}/api/adapter/history/alice", headers=admin).json()
    assert [(h["version"], h["validation_score"], h["active"]) for h in history] == [(1, 0.8, False), (2, 0.9, True)]
    assert httpx.get(f"{api_server.url}/api/adapter/history/nobody", headers=admin).json() == []
    page = httpx.get(f"{api_server.url}/dashboard/alice", headers=api_server.headers("alice"))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<td>0.800</td>" in page.text and "<td>0.900</td>" in page.text and "active: v2" in page.text
    assert httpx.get(f"{api_server.url}/dashboard/alice").status_code == 401
    assert httpx.get(f"{api_server.url}/dashboard/bob", headers=api_server.headers("alice")).status_code == 403
    export = httpx.get(f"{api_server.url}/api/adapter/users/alice/export", headers=api_server.headers("alice"), timeout=60)
    assert export.status_code == 200 and export.headers["content-type"] == "application/zip", export.text
    names = set(zipfile.ZipFile(io.BytesIO(export.content)).namelist())
    assert {"alice/README.md", "alice/export.json", "alice/adapters/v2/adapter_model.safetensors", "alice/history.json"} <= names
    assert "alice/worker_state.json" in names, "no worker ran: its (empty) state is exported all the same"
    assert httpx.get(f"{api_server.url}/api/adapter/users/bob/export", headers=api_server.headers("alice")).status_code == 403
    api_server.lifecycle(type="rolled_back", user_id="alice", job_id="job-rb", version=1, previous_version=2)
    api_server.lifecycle(type="training_completed", user_id="alice", version=2)
    metrics = api_server.wait_for(
        lambda: (lambda m: m if m["rollbacks_7d"] == 1 else None)(
            httpx.get(f"{api_server.url}/api/adapter/metrics", headers=admin).json()
        ),
        what="metrics",
    )
    assert metrics["total_adapters"] == 2 and metrics["active_users"] == 1 and metrics["average_validation_score"] == 0.9
    assert metrics["recent_trainings_24h"] == 1
    text = httpx.get(f"{api_server.url}/metrics", headers=admin).text
    assert "adaptloop_api_requests_total{" in text and 'route="/api/adapter/status/{user_id}"' in text
    assert "alice" not in text, "no per-user labels"
    assert 'adaptloop_consumer_lag_messages{group="' in text, "the worker's and the trainers' lag"
    check_metric_names(text)

    # Erasure: the user's own token (or admin's); nothing of alice left in the store, her token revoked with it.
    assert httpx.delete(f"{api_server.url}/api/adapter/users/bob", headers=api_server.headers("alice")).status_code == 403
    bad_reason = httpx.delete(f"{api_server.url}/api/adapter/users/alice", headers=admin, params={"reason": "a\x01b"})
    assert bad_reason.status_code == 422 and "reason" in bad_reason.text, "a control character is refused, nothing done"
    gone = httpx.delete(
        f"{api_server.url}/api/adapter/users/alice",
        headers=api_server.headers("alice"),
        params={"reason": "my right to erasure"},
        timeout=60,
    )
    assert gone.status_code == 200 and len(gone.json()["user_hash"]) == 32, gone.text
    assert "api tokens of the user: 1" in gone.json()["removed"]
    held = [str(p) for p in api_server.store.rglob("*") if p.is_file() and b"alice" in p.read_bytes()]
    assert held == [], "files that still name alice"
    assert httpx.get(f"{api_server.url}/api/adapter/history/alice", headers=admin).json() == []
    assert httpx.get(f"{api_server.url}/api/adapter/status/alice", headers=api_server.headers("alice")).status_code == 401
    (sent,) = [c for c in api_server.commands() if c.get("type") == "forget"]
    assert sent["user_id"] == "alice" and sent["user_hash"] == gone.json()["user_hash"]


def test_the_seed_client_snippet_works_as_written(api_server: ApiHandle, tmp_path):
    _seed_registry(api_server, tmp_path)
    snippet = f'''
import requests

API = "{api_server.url}"
headers = {{"Authorization": "Bearer {api_server.tokens["alice"]}"}}

# Trigger a retrain for a user
resp = requests.post(f"{{API}}/api/adapter/retrain", json={{"user_id": "alice", "trigger": "manual", "include_global": False}}, headers=headers)
job_id = resp.json()["job_id"]

# Check the job's status
status = requests.get(f"{{API}}/api/adapter/job/{{job_id}}", headers=headers).json()
print(status["status"])

# The user's adapter history
history = requests.get(f"{{API}}/api/adapter/history/alice", headers=headers).json()
for v in history:
    print(f"v{{v['version']}}: validation score {{v['validation_score']}}")
'''
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["queued", "v1: validation score 0.8", "v2: validation score 0.9"]


def test_tokens_from_the_command_line(tmp_path):
    import subprocess
    import sys

    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"storage_root": str(tmp_path / "store")}))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "adaptloop.cli", "--config", str(config), "api", "token", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    created = run("create", "--scope", "admin", "--scope", "user:bob")
    assert created.returncode == 0 and created.stdout.strip().startswith("al_")
    token = created.stdout.strip()
    stored = (tmp_path / "store/api/tokens.json").read_text()
    secret = token.split("_", 2)[2]  # the secret itself may hold "_" (URL-safe base64)
    assert len(secret) >= 40 and token not in stored and secret not in stored, "only the hash is stored"
    assert oct((tmp_path / "store/api/tokens.json").stat().st_mode & 0o777) == "0o600"
    token_id = token.split("_")[1]
    assert token_id in run("list").stdout and token not in run("list").stdout
    assert run("create", "--scope", "user:../x").returncode != 0
    assert run("revoke", token_id).returncode == 0 and run("revoke", token_id).returncode == 1


@pytest.mark.unit
def test_a_command_kafka_never_took_leaves_no_job_behind(tmp_path):
    """A broker that does not answer: the caller gets a 503, and no job is left `queued` forever."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.auth import TokenStore
    from api.config import ApiConfig
    from api.jobs import JobTracker
    from core.kafka.client import ClientConfig

    cfg = ApiConfig(
        client=ClientConfig(bootstrap_servers="127.0.0.1:9"),  # nothing listens there
        commands_topic="c",
        lifecycle_topic="l",
        requests_topic=None,
        users_changelog=None,
        storage_root=str(tmp_path / "store"),
        max_versions=5,
        tokens_file=tmp_path / "tokens.json",
        max_body_bytes=65536,
        command_timeout_s=1.0,
    )
    tracker = JobTracker(cfg.client, "c", "l", None)  # not started: the test reads what the API recorded
    headers = {"Authorization": f"Bearer {TokenStore(cfg.tokens_file).create(['admin'])[1]}"}
    client = TestClient(create_app(cfg, tracker))
    refused = client.post("/api/adapter/rollback", headers=headers, json={"user_id": "ana", "reason": "broker down"})
    assert refused.status_code == 503 and "not acknowledged" in refused.json()["error"]
    assert tracker.jobs == {} and tracker.counts() == {}, "no job for a command Kafka never took"
