"""Longest test files first: the order `make test`'s two xdist workers take files in.

xdist's `--dist loadfile` hands out whole files in collection order, and by
default reorders them by their number of tests: the demo and the chaos files,
one to three tests of several minutes each, went last, so one worker still ran
an eight-minute file while the other had finished. Handing out the longest
files first (longest processing time first) lets the short files fill in
around them. The seconds per file are measured, kept in tests/durations.json
and refreshed from a JUnit report of a full run:

    .venv/bin/python -m pytest -n 2 --dist loadfile --junitxml=/tmp/junit.xml
    .venv/bin/python -m tests.support.durations /tmp/junit.xml

A file missing from durations.json (a new one) goes after the measured ones, in
collection order; nothing fails when the file is stale, the order is only less
good.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

DURATIONS = Path(__file__).resolve().parents[1] / "durations.json"


def file_seconds() -> dict[str, float]:
    """Measured seconds per test file (paths relative to the repository root); {} when none were recorded."""
    try:
        return {str(k): float(v) for k, v in json.loads(DURATIONS.read_text(encoding="utf-8")).items()}
    except (FileNotFoundError, ValueError, AttributeError):
        return {}


def longest_files_first(items: list, seconds: dict[str, float]) -> list:
    """`items` with whole files ordered by measured seconds, longest first; a file's own tests keep their order."""
    first_seen: dict[str, int] = {}
    for item in items:
        first_seen.setdefault(item.nodeid.split("::")[0], len(first_seen))
    return sorted(items, key=lambda item: _file_rank(item.nodeid.split("::")[0], seconds, first_seen))


def _file_rank(path: str, seconds: dict[str, float], first_seen: dict[str, int]) -> tuple[float, int]:
    return (-seconds.get(path, 0.0), first_seen[path])


def from_junit(report: Path) -> dict[str, float]:
    """Seconds per file from a JUnit XML report (setup, call and teardown of every test case)."""
    totals: dict[str, float] = defaultdict(float)
    for case in ET.parse(report).getroot().iter("testcase"):
        path = case.get("classname", "").split(".")
        # classname is the dotted module path plus any class: keep the parts up to the test_*.py module.
        module = next((i for i, part in enumerate(path) if part.startswith("test_")), len(path) - 1)
        totals["/".join(path[: module + 1]) + ".py"] += float(case.get("time", 0.0))
    return {path: round(total, 1) for path, total in sorted(totals.items(), key=lambda kv: -kv[1])}


def main(argv: list[str]) -> int:
    """Rewrite tests/durations.json from the JUnit report named on the command line."""
    if len(argv) != 1:
        print("usage: python -m tests.support.durations JUNIT.xml", file=sys.stderr)
        return 2
    measured = from_junit(Path(argv[0]))
    if not measured:
        print(f"{argv[0]}: no test cases in this report", file=sys.stderr)
        return 1
    DURATIONS.write_text(json.dumps(measured, indent=1) + "\n", encoding="utf-8")
    print(f"{DURATIONS}: {len(measured)} files, {sum(measured.values()):.0f} s in all; longest {next(iter(measured))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
