"""Schemathesis against the live API's OpenAPI spec: valid and invalid requests for every operation.

Each generated request is sent three times: with an admin token, with no
token and with a forged one. Checked: no answer is a 5xx; nothing but the
public routes answers 2xx without a valid token; every error is JSON; and no
file appears outside the storage root.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

PUBLIC = {"/healthz", "/metrics", "/openapi.json", "/docs", "/redoc"}
EXAMPLES_PER_OPERATION = 40


def _files(folder: Path, skip: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*") if skip not in p.parents and p != skip}


def _working_dir() -> set[str]:
    """The working directory's entries, less what the test tools themselves make there (hypothesis' database)."""
    return set(os.listdir(os.getcwd())) - {".hypothesis", ".pytest_cache"}


def test_schemathesis_finds_no_5xx_no_unauthenticated_access_and_no_stray_files(api_server, tmp_path, figures):
    api = api_server
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    outside_before = _files(tmp_path, api.store) | _working_dir()
    statuses: Counter[str] = Counter()
    problems: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case) -> None:  # called at once below, so the loop variables are the current ones
                for who, headers in (
                    ("admin", api.headers()),
                    ("nobody", {}),
                    ("forged", {"Authorization": "Bearer al_0000_forged"}),
                ):
                    response = case.call(base_url=api.url, headers={**(case.headers or {}), **headers}, timeout=30)
                    statuses[f"{response.status_code // 100}xx"] += 1
                    where = f"{case.method} {case.formatted_path} as {who}"
                    if response.status_code >= 500:
                        problems.append(f"{where}: {response.status_code} {response.text[:200]}")
                    if who != "admin" and response.status_code < 300 and operation.path not in PUBLIC:  # noqa: B023
                        problems.append(f"{where}: served without a valid token ({response.status_code})")
                    content_type = str({k.lower(): v for k, v in response.headers.items()}.get("content-type", ""))
                    if response.status_code >= 400 and "json" not in content_type:
                        problems.append(f"{where}: a {response.status_code} that is not JSON")

            try:
                fuzz()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, f"{operation.label}: no valid request to make"
                continue  # nothing invalid to send (an operation without parameters)

    stray = (_files(tmp_path, api.store) | _working_dir()) - outside_before
    stray = {p for p in stray if not p.endswith(".log")}
    total = sum(statuses.values())
    figures(
        "Bad input",
        "API fuzzed with schemathesis (valid and invalid requests, every operation)",
        f"{total} requests over {len(operations)} operations, each as admin, without a token and with a forged one",
        lost=None,
        duplicated=None,
        result=(
            "no 5xx, nothing served without a valid token, every error JSON, no file outside the storage root"
            if not problems and not stray
            else f"{len(problems)} problems, stray files {sorted(stray)[:5]}"
        ),
        statuses=dict(statuses),
    )
    assert problems == [], "\n".join(problems[:20])
    assert stray == set()
