"""`make demo`'s steps as an integration test: the real default model, worker, trainer and API on the broker.

The demo itself asserts each step (and exits non-zero when one fails); this
test runs it as `make demo` does and checks what it left behind: the
narration, the registry of the demo user, the logs and the report.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.registry import AdapterRegistry

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(1800)]

RETENTION_FLOOR = 0.88  # the demo's v1 measured 0.955 (2 of 44 drifted); the benchmark's v1s 0.909-0.932


def test_the_demo_learns_rejects_poison_and_rolls_back(kafka_bootstrap):
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap)
    env.pop("ADAPTLOOP_CONFIG", None)
    done = subprocess.run([sys.executable, "-m", "adaptloop.cli", "demo"], capture_output=True, text=True, env=env, timeout=1700)
    out = done.stdout
    assert done.returncode == 0, out[-6000:] + done.stderr[-3000:]

    for step in (
        "worker ready",
        "trainer ready",
        "api ready",
        "serve ready",
        "gap threshold (3) crossed",
        "lifecycle: training_started",
        "trainer: step",
        "v1 PROMOTED",
        "v2 REJECTED by the gate",
        "trained to change 3 core-suite answer(s)",
        "ROLLED BACK: v1 -> base model",
        "demo done",
    ):
        assert step in out, f"missing {step!r}:\n{out[-6000:]}"
    assert out.count("dead letter (") == 7
    assert out.count("LEARNED |") >= 2 and "kept    | What is the capital of France?" in out
    assert out.index("v1 PROMOTED") < out.index("v2 REJECTED") < out.index("ROLLED BACK")

    workdir = Path(re.search(r"demo files and logs in (\S+)", out).group(1))
    user = re.search(r"asking (demo-uma-\w+)'s questions through adaptloop serve", out).group(1)
    # One server, never restarted, answered with the base model, then v1, then the base model after the rollback.
    served = re.findall(r"served by (adaptloop:[^:\s]+)", out)
    assert served == ["adaptloop:base", f"adaptloop:{user}@v1", "adaptloop:base"], served
    registry = AdapterRegistry(workdir / "store")
    assert [i.version for i in registry.versions(user)] == [1, 2]
    assert [(r["version"], r["passed"]) for r in registry.validation_results(user)] == [(1, True), (2, False)]
    # Learning without forgetting (#8): the facts are learned and the 44 general prompts of the core
    # suite (none of them trained on, none in the anchor set) keep their base answers.
    metrics = registry.info(user, 1).manifest.metrics
    assert metrics.facts_learned >= 0.66 and metrics.retention >= RETENTION_FLOOR, metrics
    assert registry.active(user) is None, "rolled back past v1: the base model"
    assert [(r["from_version"], r["to_version"]) for r in registry.rollback_log(user)] == [(1, None)]
    assert json.loads(registry.verify(user, 1).path.joinpath("adapter_config.json").read_text())["peft_type"] == "LORA"
    page = (workdir / "report" / "index.html").read_text()
    assert "v1" in page and "rolled_back_from" in page and (workdir / "report" / "loss_v1.png").is_file()
    assert not json.loads((workdir / "stack.json").read_text())["services"], "the demo stopped its stack"
