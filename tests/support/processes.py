"""One harness for the service processes tests run (worker, trainer, API), and waiting for states."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# The jars are fetched once per machine; tests share the user's cache for them.
JAR_CACHE = Path(os.environ.get("ADAPTLOOP_TEST_CACHE", Path.home() / ".cache" / "adaptloop"))


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    *,
    interval: float = 0.5,
    check: Callable[[], None] | None = None,
    context: Callable[[], str] = lambda: "",
):
    """Poll `predicate` until it returns something truthy (returned); `check` may raise early (a process died).

    The timeout is a generous bound for a slow machine, never the condition itself.
    """
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        if check is not None:
            check()
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last={last!r}\n{context()}")


def run_cli(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`adaptloop ARGS` with the test jar cache and without the session broker's KAFKA_BOOTSTRAP_SERVERS."""
    full_env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    full_env["ADAPTLOOP_CACHE_DIR"] = str(JAR_CACHE)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "adaptloop.cli", *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def stop_processes(procs: list[subprocess.Popen], timeout: float = 30) -> None:
    """Terminate processes a test started (SIGTERM, then SIGKILL)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()


@dataclass
class Service:
    """One kind of `adaptloop` service a test runs: `adaptloop --config CONFIG ARGS...`, every start logging to one file.

    `ready(log)` says, from the log written since this start, whether the
    process is ready; `start()` waits for it (or fails with the log's tail).
    """

    config: Path
    args: tuple[str, ...]
    log_path: Path
    ready: Callable[[str], bool]
    bootstrap: str
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, timeout: float = 180) -> subprocess.Popen:
        since = self.launch()
        self.wait_ready(since, timeout)
        return self.proc

    def launch(self) -> int:
        """Start a process without waiting for it; returns where its log begins (for `wait_ready`)."""
        since = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap, **self.env}
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "adaptloop.cli", "--config", str(self.config), *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.config.parent,
            )
        self.procs.append(proc)
        return since

    def wait_ready(self, since: int, timeout: float = 180) -> None:
        wait_until(
            lambda: self.ready(self.log_since(since)),
            timeout,
            f"{self.args[0]} ready",
            interval=0.2,
            check=self.check_alive,
            context=self.log_tail,
        )

    @property
    def proc(self) -> subprocess.Popen:
        return self.procs[-1]

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.procs and self.proc.poll() is not None:
            raise AssertionError(f"{self.args[0]} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the newest process."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_processes(self.procs)


def log_says(text: str) -> Callable[[str], bool]:
    return lambda log: text in log
