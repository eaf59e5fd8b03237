"""`adaptloop up` / `down`: the whole stack as detached processes, logs in one place, stopped cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import httpx
import pytest
import yaml

from core.kafka.broker import free_port, pid_alive
from tests.support.processes import JAR_CACHE

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

TOPICS = ("intent_traces", "feedback", "conversations", "concept_gaps", "commands", "training_requests", "lifecycle", "dlq")


def _adaptloop(config, env, *args, timeout=600, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adaptloop.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=cwd,
    )


def test_up_starts_worker_trainer_api_and_serve_and_down_stops_them(kafka_bootstrap, tmp_path):
    from trainer.model import build_tiny_model

    suffix = uuid.uuid4().hex[:8]
    ports = {"api": free_port(), "worker": free_port(), "trainer": free_port(), "serve": free_port()}
    config = tmp_path / "adapter_retrain.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage_root": str(tmp_path / "store"),
                "cache_dir": str(tmp_path / "cache"),
                "topics": {k: {"name": f"up.{k}.{suffix}", "partitions": 1} for k in TOPICS},
                "streams": {"app_id": f"up-{suffix}", "internal_partitions": 1, "web_port": ports["worker"]},
                "model": {"base_model": str(build_tiny_model(tmp_path / "tiny")), "dtype": "float32"},
                "training": {"group_id": f"up-{suffix}", "metrics_port": ports["trainer"]},
                "api": {"port": ports["api"]},
                "serving": {"port": ports["serve"]},
            }
        )
    )
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap)
    run_dir, working_dir = tmp_path / "run", tmp_path / "wd"
    working_dir.mkdir()
    try:
        up = _adaptloop(config, env, "up", "--run-dir", str(run_dir), cwd=working_dir)
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"logs: {run_dir / 'logs'}" in up.stdout and "up: api, serve, trainer, worker" in up.stdout
        for name in ("worker", "trainer", "api", "serve"):
            assert f"{name} ready" in up.stdout and (run_dir / "logs" / f"{name}.log").is_file()
        state = json.loads((run_dir / "stack.json").read_text())
        pids = {name: s["pid"] for name, s in state["services"].items()}
        assert all(pid_alive(pid) for pid in pids.values())
        assert httpx.get(f"http://127.0.0.1:{ports['api']}/healthz").json()["status"] == "ok"
        assert httpx.get(f"http://127.0.0.1:{ports['serve']}/healthz").json()["status"] == "ok"
        assert "adaptloop_worker_events_consumed_total" in httpx.get(f"http://127.0.0.1:{ports['worker']}/metrics").text
        assert "adaptloop_trainer_busy" in httpx.get(f"http://127.0.0.1:{ports['trainer']}/metrics").text

        again = _adaptloop(config, env, "up", "--run-dir", str(run_dir), "--services", "worker")
        assert again.returncode == 0 and "worker already running" in again.stdout, again.stdout + again.stderr
        assert json.loads((run_dir / "stack.json").read_text())["services"]["worker"]["pid"] == pids["worker"]
        bad = _adaptloop(config, env, "up", "--run-dir", str(run_dir), "--services", "worker,db")
        assert bad.returncode == 2 and "unknown service(s) db" in bad.stderr
    finally:
        down = _adaptloop(config, env, "down", "--run-dir", str(run_dir))
    assert (
        down.returncode == 0
        and "stopping serve" in down.stdout
        and "stopping api" in down.stdout
        and down.stdout.strip().endswith("down")
    ), down.stdout + down.stderr
    assert not any(pid_alive(pid) for pid in pids.values())
    assert "signal 15: checkpointing and leaving the group" in (run_dir / "logs" / "trainer.log").read_text()
    assert json.loads((run_dir / "stack.json").read_text())["services"] == {}
    assert list(working_dir.iterdir()) == [], "nothing written to the working directory"
    assert (tmp_path / "cache" / "streams" / f"up-{suffix}").is_dir(), "the worker's local files live in the cache dir"


def test_up_starts_the_local_broker_when_none_is_given_and_down_stops_it(tmp_path):
    port = free_port()
    config = tmp_path / "adapter_retrain.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage_root": str(tmp_path / "store"),
                "cache_dir": str(JAR_CACHE),
                "kafka": {
                    "bootstrap_servers": f"127.0.0.1:{port}",
                    "local_broker": {"port": port, "data_dir": str(tmp_path / "kafka")},
                },
                "api": {"port": free_port()},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    run_dir = tmp_path / "run"
    try:
        up = _adaptloop(config, env, "up", "--run-dir", str(run_dir), "--services", "api")
        assert up.returncode == 0 and f"local broker at 127.0.0.1:{port}" in up.stdout, up.stdout + up.stderr
        assert "created topic interactions.feedback" in up.stdout and "api ready" in up.stdout
    finally:
        down = _adaptloop(config, env, "down", "--run-dir", str(run_dir))
    assert down.returncode == 0 and f"stopped the local broker on port {port}" in down.stdout, down.stdout + down.stderr
    assert _adaptloop(config, env, "kafka", "status").stdout.strip() == f"no broker on port {port}"
