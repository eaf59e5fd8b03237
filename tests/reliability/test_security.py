"""The security review's points, each with a test.

- No pickle anywhere: adapters, checkpoints and caches are written as
  safetensors or JSON, and loading them unpickles nothing (pickle and
  torch.load are made to fail while they load).
- Secrets (API tokens, SASL passwords) never appear in logs, errors, commands
  or lifecycle events.
(Kafka TLS and SASL, end to end: tests/reliability/test_kafka_security.py.)
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml

from core.errors import TrainingInterrupted
from schemas.training import TrainingExample
from tests.support.adapters import manifest
from trainer.anchors import AnchorSet
from trainer.model import BaseModelRef, load_base
from trainer.registry import AdapterRegistry
from trainer.train import TrainConfig, TrainHooks, train_adapter

EXAMPLES = [TrainingExample(prompt=f"What is code {n}?", response=f"Code {n} is {n * 7}.") for n in range(4)]


def _is_pickle(path: Path) -> bool:
    head = path.read_bytes()[:2]
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocol 2-5
        return True
    if zipfile.is_zipfile(path):  # torch.save's format: a zip around data.pkl
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(".pkl") for name in archive.namelist())
    return False


@pytest.fixture
def no_unpickling(monkeypatch):
    import torch

    def refuse(*_args, **_kwargs):
        raise AssertionError("something unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.unit
def test_adapters_checkpoints_and_caches_are_never_pickles_and_load_without_unpickling(tiny_model_dir, tmp_path, no_unpickling):
    from peft import PeftModel
    from safetensors import safe_open

    model, tokenizer, device = load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")
    cfg = TrainConfig.from_settings(epochs=2, batch_size=2, r=4, alpha=8, checkpoint_every=1)
    checkpoint = tmp_path / "checkpoints" / "job"
    stops = iter([False, False, True])
    with pytest.raises(TrainingInterrupted):
        train_adapter(
            model,
            tokenizer,
            device,
            EXAMPLES,
            cfg,
            tmp_path / "first",
            checkpoint,
            TrainHooks(should_stop=lambda: next(stops, False)),
        )
    resumed = train_adapter(model, tokenizer, device, EXAMPLES, cfg, tmp_path / "adapter", checkpoint)  # loads the checkpoint
    assert resumed.resumed_from_step == 3
    registry = AdapterRegistry(tmp_path / "store")
    info = registry.register("sec", resumed.adapter_dir, manifest(request_id="r"))
    adapted = PeftModel.from_pretrained(model, str(registry.verify("sec", info.version).path))  # as `ask` and the gate load it
    adapted.unload()
    anchors = AnchorSet(["What is the capital of France?"], tmp_path / "cache", "ab" * 32)
    first = anchors.answers(model, tokenizer, device, anchors.prompts)
    again = AnchorSet(anchors.prompts, tmp_path / "cache", "ab" * 32).answers(
        model, tokenizer, device, anchors.prompts
    )  # from the cache
    assert first == again

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.suffix for p in written} >= {".safetensors", ".json", ".jsonl"}
    assert [p for p in written if _is_pickle(p) or p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")] == []
    for path in written:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as fh:
                assert list(fh.keys())


def _run_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adaptloop.cli", *args], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


@pytest.mark.kafka
def test_secrets_never_reach_logs_errors_or_events(api_server, tmp_path, figures):
    api = api_server
    admin, alice = api.tokens["admin"], api.tokens["alice"]
    forged = "al_deadbeef_" + "S3cretForgedToken" * 2
    accepted = httpx.post(
        f"{api.url}/api/adapter/rollback",
        json={"user_id": "alice", "reason": "security test"},
        headers=api.headers("alice"),
        timeout=30,
    )
    assert accepted.status_code == 202, accepted.text
    answers = [
        httpx.get(f"{api.url}/api/adapter/status/alice", headers={"Authorization": f"Bearer {forged}"}, timeout=30),
        httpx.get(f"{api.url}/api/adapter/status/bob", headers=api.headers("alice"), timeout=30),
        httpx.get(f"{api.url}/api/adapter/status/alice", headers={"Authorization": forged}, timeout=30),
    ]
    assert [a.status_code for a in answers] == [401, 403, 401]
    api.lifecycle(type="training_failed", user_id="alice", request_id="r-sec", reason="a failure to report")
    api.wait_for(
        lambda: (
            httpx.get(f"{api.url}/api/adapter/job/{accepted.json()['job_id']}", headers=api.headers(), timeout=30).status_code
            == 200
        ),
        what="the job known",
    )

    sasl_password = "hunter2-Kafka-Pa55"
    env = {
        "ADAPTLOOP_KAFKA__SASL_PASSWORD": sasl_password,
        "ADAPTLOOP_KAFKA__SASL_USERNAME": "adaptloop",
        "ADAPTLOOP_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "ADAPTLOOP_KAFKA__SASL_MECHANISM": "PLAIN",
    }
    shown = _run_cli("--config", str(api.config), "config", "show", env=env)
    assert shown.returncode == 0 and "adaptloop" in shown.stdout, shown.stderr
    bad = dict(yaml.safe_load(api.config.read_text()), kafka={"sasl_password": sasl_password, "sasl_mechanism": "NOPE"})
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text(yaml.safe_dump(bad))
    refused = _run_cli("config", "check", str(bad_config), env={})
    assert refused.returncode != 0 and "sasl_mechanism" in refused.stdout + refused.stderr

    places = {
        "API log": (tmp_path / "api.log").read_text(errors="replace"),
        "API answers": "".join(a.text + json.dumps(dict(a.headers)) for a in [accepted, *answers]),
        "commands topic": "".join(json.dumps(c) for c in api.commands()),
        "token store": (api.store / "api" / "tokens.json").read_text(),
        "config show": shown.stdout + shown.stderr,
        "config check error": refused.stdout + refused.stderr,
    }
    secrets = {"admin token": admin, "user token": alice, "forged token": forged, "SASL password": sasl_password}
    leaks = [(secret, place) for secret, value in secrets.items() for place, text in places.items() if value in text]
    figures(
        "Security",
        "Secrets in logs, errors, commands and events",
        f"{len(secrets)} secrets (API tokens valid and forged, a SASL password) through the API, its log, the commands "
        "topic, the token store and config errors",
        lost=None,
        duplicated=None,
        result="none found" if not leaks else f"LEAKED: {leaks}",
        places=sorted(places),
    )
    assert leaks == []
