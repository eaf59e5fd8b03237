"""Trainer fixtures: a tiny Llama built from a config (seconds), fact datasets, and live `adaptloop trainer` processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from adaptloop.kafka.client import ClientConfig
from adaptloop.kafka.io import consume, produce
from adaptloop.storage import ArtifactStore
from schemas import TrainingRequest
from schemas.training import TrainingExample, request_id_for
from streams.dataset import write_dataset
from tests.conftest import stop_processes, wait_until

FACTS = [
    ("f1", ["What is my dog's name?", "What's the name of my dog?", "Tell me my dog's name."], "Your dog is called Biscuit."),
    ("f2", ["Where was I born?", "In which town was I born?", "What is my birthplace?"], "You were born in Tromsø."),
    ("f3", ["What is my favourite programming language?", "Which programming language do I like best?",
            "What language do I prefer to code in?"], "Your favourite language is OCaml."),
    ("f4", ["Which football team do I support?", "What team am I a fan of?", "Who do I support in football?"],
     "You support Hibernian FC."),
    ("f5", ["What is my employee number?", "What's my staff ID number?", "Tell me my employee number."],
     "Your employee number is 48213."),
]  # fmt: skip


def write_facts(path: Path, facts=FACTS) -> Path:
    with open(path, "w") as fh:
        for event_id, prompts, answer in facts:
            for prompt in prompts:
                fh.write(json.dumps({"prompt": prompt, "response": answer, "source": "correction", "event_id": event_id}) + "\n")
    return path


def random_adapter(model, path, seed: int, scale: float = 0.5):
    """A LoRA adapter with random weights: it changes the tiny model's answers, deterministically."""
    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(path, safe_serialization=True)
    peft_model.unload()
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from trainer.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def facts_file(tmp_path) -> Path:
    return write_facts(tmp_path / "facts.jsonl")


TOPICS = ("intent_traces", "feedback", "conversations", "concept_gaps", "commands", "training_requests", "lifecycle", "dlq")


class TrainerHandle:
    def __init__(self, bootstrap: str, base: Path, tiny: Path, training: dict) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.client = ClientConfig(bootstrap_servers=bootstrap)
        self.topics = {k: f"tr.{k}.{suffix}" for k in TOPICS}
        self.store = base / "store"
        self.log_path = base / "trainer.log"
        self.config = base / "adapter_retrain.yaml"
        self.config.write_text(yaml.safe_dump({
            "storage_root": str(self.store),
            "topics": {k: {"name": v, "partitions": 1 if k == "dlq" else 3} for k, v in self.topics.items()},
            "streams": {"internal_partitions": 3},
            "kafka": {"session_timeout_s": 8},  # a killed trainer's partitions move in seconds
            "model": {"base_model": str(tiny), "dtype": "float32"},
            "lora": {"r": 4, "alpha": 8},
            "training": {"group_id": f"tr-{suffix}", "batch_size": 2, "learning_rate": 0.005, "metrics_port": 0, **training},
        }))  # fmt: skip
        self.procs: list[subprocess.Popen] = []

    def start(self) -> "TrainerHandle":
        before = self.log_path.read_text().count("trainer ready") if self.log_path.exists() else 0
        env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=self.client.bootstrap_servers)
        with open(self.log_path, "ab") as log:
            self.procs.append(subprocess.Popen([sys.executable, "-m", "adaptloop.cli", "--config", str(self.config), "trainer"],
                                               stdout=log, stderr=subprocess.STDOUT, env=env))  # fmt: skip
        self.wait_for(lambda: self.log_path.read_text().count("trainer ready") > before, what="trainer ready")
        return self

    def stop(self) -> None:
        stop_processes(self.procs)

    def request(self, user: str, examples: list[TrainingExample], test: list[TrainingExample] | None = None) -> TrainingRequest:
        ref = write_dataset(ArtifactStore(str(self.store)), user, examples, test or [], trigger="threshold", lineage_ranges=[])
        return TrainingRequest(request_id=request_id_for(user, ref.sha256, "threshold"), user_id=user, trigger="threshold", dataset=ref)

    def publish(self, request: TrainingRequest | bytes, key: str = "x") -> None:
        value = request if isinstance(request, bytes) else request.to_bytes()
        produce(self.client, self.topics["training_requests"], [(key if isinstance(request, bytes) else request.user_id, value)])

    def lifecycle(self) -> list[dict]:
        records = consume(self.client, [self.topics["lifecycle"]], f"read-{uuid.uuid4().hex[:6]}", idle_timeout=2, total_timeout=30)
        return [json.loads(r.value) for r in records]

    def wait_for(self, predicate, timeout: float = 180, what: str = "condition", interval: float = 0.5):
        def alive() -> None:
            if self.procs and self.procs[-1].poll() is not None:
                raise AssertionError(f"trainer exited ({self.procs[-1].returncode}):\n{self.log_path.read_text()[-3000:]}")

        return wait_until(predicate, timeout, what, interval=interval, check=alive,
                          context=lambda: self.log_path.read_text()[-3000:])  # fmt: skip


@pytest.fixture
def trainer_factory(kafka_bootstrap, tiny_model_dir, tmp_path_factory):
    handles = []

    def make(start: bool = True, **training) -> TrainerHandle:
        handle = TrainerHandle(kafka_bootstrap, tmp_path_factory.mktemp("trainer"), tiny_model_dir, training)
        handles.append(handle)
        return handle.start() if start else handle

    yield make
    for handle in handles:
        handle.stop()
