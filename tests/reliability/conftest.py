"""Reliability tests: faults and hostile input against the real broker and real processes.

Every test here records what it injected and what was lost or duplicated
through the `figures` fixture. `make reliability` runs this directory and
writes docs/RELIABILITY.md from those records (tests/reliability/report.py);
a plain `make test` runs the same tests and throws the records away.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

FIGURES_ENV = "ADAPTLOOP_RELIABILITY_FIGURES"


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/reliability/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.reliability)


@pytest.fixture
def figures(request):
    """`figures(area, what, injected, lost=0, duplicated=0, result="", **numbers)`: one row of docs/RELIABILITY.md."""
    rows: list[dict] = []

    def record(
        area: str, what: str, injected: str, lost: int | None = 0, duplicated: int | None = 0, result: str = "", **numbers
    ) -> None:
        rows.append(
            {
                "area": area,
                "what": what,
                "injected": injected,
                "lost": lost,
                "duplicated": duplicated,
                "result": result,
                "numbers": numbers,
                "test": request.node.nodeid,
            }
        )

    yield record
    out = os.environ.get(FIGURES_ENV)
    if out and rows:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(rows, indent=2))
