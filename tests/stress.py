"""Run tests on a machine made slower, so a test that races the clock fails here first.

    python tests/stress.py hog  -- -m "kafka or slow"     # a busy loop on every core beside the tests
    python tests/stress.py pin  -- -m "kafka or slow"     # every process pinned to one core (taskset -c 0)
    python tests/stress.py none -- -m "kafka or slow"     # as it is (a baseline for the same command)
    python tests/stress.py pin --core 1 -- -m "kafka or slow"   # pinned to another core

Two pinned runs on different cores (each with its own `--basetemp`) may run
side by side: each still has one core to itself.

`make test-stress` runs the first. Tests must wait for states, never for
times (the sleep-then-act pattern, a short idle window on a topic), so each
of these runs passes on any machine; one that fails only here has a timing
flaw. The last line is a summary to paste into a table: mode, outcome, counts
and minutes.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime

MODES = ("hog", "pin", "none")


def _busy() -> None:
    while True:
        pass


def run(mode: str, pytest_args: list[str], core: int = 0) -> int:
    command = [sys.executable, "-m", "pytest", *pytest_args]
    hogs: list[multiprocessing.Process] = []
    if mode == "pin":
        if shutil.which("taskset") is None:
            raise SystemExit("pin needs taskset (util-linux)")
        command = ["taskset", "-c", str(core), *command]
    elif mode == "hog":
        hogs = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(os.cpu_count() or 1)]
        for hog in hogs:
            hog.start()
    started = time.monotonic()
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finally:
        for hog in hogs:
            hog.kill()
    sys.stdout.write(done.stdout)
    minutes = (time.monotonic() - started) / 60
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    counts = ", ".join(re.findall(r"\d+ (?:passed|failed|error|errors|skipped|deselected)", tail))
    outcome = "green" if done.returncode == 0 else f"RED (exit {done.returncode})"
    stamp = datetime.now(UTC).isoformat(timespec="minutes")
    where = f" core={core}" if mode == "pin" else ""
    print(f"stress: {stamp} mode={mode}{where} cpus={os.cpu_count()} {outcome}: {counts} in {minutes:.1f} min")
    return done.returncode


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] not in MODES:
        raise SystemExit(f"usage: python tests/stress.py {{{'|'.join(MODES)}}} [--core N] [-- PYTEST ARGS]")
    mode, rest = args[0], args[1:]
    core = 0
    if rest[:1] == ["--core"]:
        if len(rest) < 2 or not rest[1].isdigit():
            raise SystemExit("--core takes a CPU number, e.g. --core 1")
        core, rest = int(rest[1]), rest[2:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    sys.exit(run(mode, rest, core))


if __name__ == "__main__":
    main()
