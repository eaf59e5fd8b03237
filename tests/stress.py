"""Run tests on a machine made slower, so a test that races the clock fails here first.

    python tests/stress.py hog  -- -m "kafka or slow"     # a busy loop on every core beside the tests
    python tests/stress.py pin  -- -m "kafka or slow"     # every process pinned to one core (taskset -c 0)
    python tests/stress.py none -- -m "kafka or slow"     # as it is (a baseline for the same command)
    python tests/stress.py pin --core 1 -- -m "kafka or slow"   # pinned to another core
    python tests/stress.py hog --runs 3 -- -m "kafka or slow"   # three copies side by side

`--runs N` starts N copies of the same pytest command at once, each with its
own `--basetemp`: under `hog` they share the busy loops (so each copy has
less than a core), under `pin` they are spread over the cores in turn (copies
on the same core share it). Either is harsher than one run alone.

`make test-stress` runs the first. Tests must wait for states, never for
times (the sleep-then-act pattern, a short idle window on a topic), so each
of these runs passes on any machine; one that fails only here has a timing
flaw. The last lines are summaries to paste into a table, one per copy:
mode, outcome, counts and minutes.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

MODES = ("hog", "pin", "none")


def _busy() -> None:
    while True:
        pass


def _command(mode: str, pytest_args: list[str], core: int) -> list[str]:
    command = [sys.executable, "-m", "pytest", *pytest_args]
    if mode == "pin":
        if shutil.which("taskset") is None:
            raise SystemExit("pin needs taskset (util-linux)")
        command = ["taskset", "-c", str(core), *command]
    return command


def _summary(mode: str, core: int, returncode: int, output: str, minutes: float) -> str:
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    counts = ", ".join(re.findall(r"\d+ (?:passed|failed|error|errors|skipped|deselected)", tail))
    outcome = "green" if returncode == 0 else f"RED (exit {returncode})"
    stamp = datetime.now(UTC).isoformat(timespec="minutes")
    where = f" core={core}" if mode == "pin" else ""
    return f"stress: {stamp} mode={mode}{where} cpus={os.cpu_count()} {outcome}: {counts} in {minutes:.1f} min"


def run(mode: str, pytest_args: list[str], core: int = 0, runs: int = 1) -> int:
    """Run `runs` copies of pytest under `mode`; print each one's output, then one summary line per copy."""
    cpus = os.cpu_count() or 1
    hogs: list[multiprocessing.Process] = []
    if mode == "hog":
        hogs = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(cpus)]
        for hog in hogs:
            hog.start()
    cores = [(core + index) % cpus for index in range(runs)]
    logs: list[Path] = []
    children: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    finished: dict[int, float] = {}
    try:
        for index, where in enumerate(cores):
            args = list(pytest_args)
            if runs > 1:
                # side by side, each copy needs its own temporary tree
                args.append(f"--basetemp={tempfile.mkdtemp(prefix=f'stress-{index}-')}")
            log = Path(tempfile.mkstemp(prefix=f"stress-{index}-", suffix=".log")[1])
            logs.append(log)
            with log.open("wb") as sink:
                children.append(subprocess.Popen(_command(mode, args, where), stdout=sink, stderr=subprocess.STDOUT))
        while len(finished) < len(children):
            for index, child in enumerate(children):
                if index not in finished and child.poll() is not None:
                    finished[index] = (time.monotonic() - started) / 60
            time.sleep(1)  # how often to look: only the reported minutes depend on it
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
        for hog in hogs:
            hog.kill()
    summaries = []
    for index, child in enumerate(children):
        output = logs[index].read_text(errors="replace")
        sys.stdout.write(output)
        summaries.append(_summary(mode, cores[index], child.returncode, output, finished[index]))
    print("\n".join(summaries))
    return max(child.returncode for child in children)


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] not in MODES:
        raise SystemExit(f"usage: python tests/stress.py {{{'|'.join(MODES)}}} [--core N] [--runs N] [-- PYTEST ARGS]")
    mode, rest = args[0], args[1:]
    options = {"--core": 0, "--runs": 1}
    while rest[:1] and rest[0] in options:
        if len(rest) < 2 or not rest[1].isdigit():
            raise SystemExit(f"{rest[0]} takes a number, e.g. {rest[0]} 1")
        options[rest[0]], rest = int(rest[1]), rest[2:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    sys.exit(run(mode, rest, options["--core"], max(1, options["--runs"])))


if __name__ == "__main__":
    main()
