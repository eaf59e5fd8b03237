"""Regenerate docs/RELIABILITY.md: run the reliability tests and tabulate what they injected and lost.

    .venv/bin/python -m tests.reliability.report [-k EXPR]   (or: make reliability)

Runs `pytest tests/reliability` with the figures recorder on, then writes
the table (area, what was injected, how often, lost, duplicated, result)
with the machine and the date. Nothing is written if a test fails: the
document only ever shows figures from a passing run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "RELIABILITY.md"
AREAS = ("Faults", "Bad input", "Security", "Privacy")

INTRO = """# Reliability

What adaptloop was put through and what it lost. Every row is a test in
`tests/reliability/` (run by CI on every change, marked `reliability`); this
page is regenerated from a passing run of them with

```bash
make reliability        # = .venv/bin/python -m tests.reliability.report
```

"Lost" and "duplicated" count the effects that matter to a user (an event
not counted, counted twice, a request without a version or with two), not
redeliveries on a topic, which are expected (at-least-once) and deduplicated
by `event_id` / `request_id`.
"""


PENDING = """## Not covered yet

Faults in more than one place at once (say, the broker restarting while a
worker is killed), a slow or flaky disk rather than a full one, and network
partitions between a client and the broker (only whole-broker outages are
injected). The security and privacy points are listed with their tests in
docs/SECURITY.md; encryption at rest is not built yet.
"""


def _cell(value) -> str:
    return "–" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def render(rows: list[dict], machine: str, date: str, seconds: float) -> str:
    lines = [INTRO, f"Last run: {date}, {machine}; the tests took {seconds / 60:.1f} min.", ""]
    for area in AREAS:
        chosen = [r for r in rows if r["area"] == area]
        if not chosen:
            continue
        lines += [f"## {area}", "", "| what | injected | lost | duplicated | result |", "| --- | --- | ---: | ---: | --- |"]
        lines += [
            f"| {_cell(r['what'])} | {_cell(r['injected'])} | {_cell(r['lost'])} | {_cell(r['duplicated'])} | {_cell(r['result'])} |"
            for r in chosen
        ]
        lines.append("")
    lines += [
        PENDING,
        "## Raw figures",
        "",
        "Per test, the numbers behind the table:",
        "",
        "```json",
        json.dumps({r["test"]: r["numbers"] for r in rows if r["numbers"]}, indent=1, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default=None, help="only the tests matching this pytest expression (the page then lists only them)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="adaptloop-reliability-") as out:
        env = dict(os.environ, ADAPTLOOP_RELIABILITY_FIGURES=out)
        command = [sys.executable, "-m", "pytest", "tests/reliability", "-p", "no:cacheprovider"] + (
            ["-k", args.k] if args.k else []
        )
        started = time.monotonic()
        code = subprocess.call(command, cwd=REPO, env=env)
        seconds = time.monotonic() - started
        if code != 0:
            print(f"reliability tests failed (exit {code}); {DOC} left as it was", file=sys.stderr)
            return code
        rows = [row for path in sorted(Path(out).glob("*.json")) for row in json.loads(path.read_text())]
    rows.sort(key=lambda r: (AREAS.index(r["area"]) if r["area"] in AREAS else len(AREAS), r["test"]))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render(rows, machine, datetime.now(UTC).strftime("%Y-%m-%d"), seconds), encoding="utf-8")
    print(f"wrote {DOC} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
