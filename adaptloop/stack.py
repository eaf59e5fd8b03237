"""`adaptloop up` / `adaptloop down`: the whole stack on this machine, without Docker.

    adaptloop up      # broker (unless KAFKA_BOOTSTRAP_SERVERS is set), topics, worker, trainer, API, serve
    adaptloop down    # stops what `up` started (the trainer checkpoints first); data is kept

Each service runs as its own detached process with the same settings file
`up` was given; their logs and pids live in one directory, `<cache_dir>/stack`
(printed by `up`, which also waits until every service says it is ready).
Running `up` twice starts only what is not running; `down` stops the
services in reverse order, and the broker only if `up` started it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from core.errors import AdaptloopError
from core.kafka.broker import pid_alive, terminate
from core.settings import Settings
from core.storage import atomic_write_json


@dataclass(frozen=True)
class Service:
    name: str
    args: tuple[str, ...]  # after `adaptloop --config FILE`
    ready: Callable[[str], bool]  # given its log since this start
    url: str = ""


def _log_says(text: str) -> Callable[[str], bool]:
    return lambda log: text in log


def _answers(url: str) -> Callable[[str], bool]:
    def check(_log: str) -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def services(settings: Settings) -> list[Service]:
    """The stack, in start order (stopped in reverse): worker, trainer, API, serve."""
    api, serve = settings.api, settings.serving
    worker_port, trainer_port = settings.streams.web_port, settings.training.metrics_port
    api_url, serve_url = f"http://{api.host}:{api.port}", f"http://{serve.host}:{serve.port}"
    return [
        Service(
            "worker",
            ("worker", "--web-port", str(worker_port)),
            _log_says("Worker ready"),
            f"http://127.0.0.1:{worker_port}/metrics" if worker_port else "",
        ),
        Service(
            "trainer",
            ("trainer", "--metrics-port", str(trainer_port)),
            _log_says("trainer ready"),
            f"http://127.0.0.1:{trainer_port}/metrics" if trainer_port else "",
        ),
        Service("api", ("api", "--host", api.host, "--port", str(api.port)), _answers(f"{api_url}/healthz"), f"{api_url}/docs"),
        Service(
            "serve",
            ("serve", "--host", serve.host, "--port", str(serve.port)),
            _answers(f"{serve_url}/healthz"),
            f"{serve_url}/v1",
        ),
    ]


class Stack:
    """The state file `<run_dir>/stack.json`: {name: {"pid", "log", "url"}} plus how the broker came to be."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.state_file = self.run_dir / "stack.json"

    def state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, ValueError):
            return {"services": {}, "broker_port": None}

    def _save(self, state: dict) -> None:
        atomic_write_json(self.state_file, state)

    def running(self) -> dict[str, dict]:
        return {name: s for name, s in self.state()["services"].items() if pid_alive(s["pid"])}

    def up(
        self,
        config_file: Path,
        bootstrap: str,
        wanted: list[Service],
        broker_port: int | None,
        say: Callable[[str], None] = print,
        timeout_s: float = 600,
    ) -> dict[str, dict]:
        """Start every service of `wanted` that is not running; wait until each is ready."""
        state = self.state()
        if broker_port is not None:
            state["broker_port"] = broker_port
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=bootstrap, ADAPTLOOP_CONFIG=str(config_file))
        started: list[tuple[Service, subprocess.Popen, Path]] = []
        for service in wanted:
            if service.name in self.running():
                say(f"{service.name} already running (pid {state['services'][service.name]['pid']})")
                continue
            log = logs / f"{service.name}.log"
            with open(log, "ab") as fh:
                fh.write(f"\n==== adaptloop up: starting {service.name} at {time.strftime('%Y-%m-%dT%H:%M:%S')} ====\n".encode())
                fh.flush()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "adaptloop.cli", "--config", str(config_file), *service.args],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )
            state["services"][service.name] = {"pid": proc.pid, "log": str(log), "url": service.url}
            self._save(state)
            started.append((service, proc, log))
            say(f"started {service.name} (pid {proc.pid}), log {log}")
        deadline = time.monotonic() + timeout_s
        for service, proc, log in started:
            # Only this run's part of the log counts: an old "ready" line is not believed.
            since = log.read_text(errors="replace").rfind("==== adaptloop up: starting")
            while not service.ready(log.read_text(errors="replace")[since:]):
                if proc.poll() is not None:
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                    raise AdaptloopError(f"{service.name} exited with {proc.returncode} while starting; {log}:\n{tail}")
                if time.monotonic() > deadline:
                    raise AdaptloopError(f"{service.name} not ready in {timeout_s:.0f}s; see {log}")
                time.sleep(0.5)
            say(f"{service.name} ready" + (f": {service.url}" if service.url else ""))
        return self.running()

    def down(self, say: Callable[[str], None] = print, timeout_s: float = 120) -> int | None:
        """Stop the services in reverse start order; return the broker port to stop, if `up` started one."""
        state = self.state()
        for name in reversed(list(state["services"])):
            pid = state["services"][name]["pid"]
            if pid_alive(pid):
                say(f"stopping {name} (pid {pid})")
                terminate(pid, timeout_s, name)
            else:
                say(f"{name} was not running")
        broker = state.get("broker_port")
        self._save({"services": {}, "broker_port": None})
        return broker
