"""`adaptloop train`: one user from a file, or `--batch` users in one batched pass, each gated, on the tiny model."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from adaptloop.cli import cli
from trainer.registry import AdapterRegistry

pytestmark = pytest.mark.unit


@pytest.fixture
def config(tmp_path, tiny_model_dir):
    path = tmp_path / "adapter_retrain.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "storage_root": str(tmp_path / "store"),
                "cache_dir": str(tmp_path / "cache"),
                "model": {"base_model": str(tiny_model_dir), "dtype": "float32"},
                "lora": {"r": 4, "alpha": 8},
                "training": {"epochs": 2, "batch_size": 2, "learning_rate": 0.005},
            }
        )
    )
    return path


def _dataset(path, user: str, n: int) -> str:
    lines = [
        {"prompt": f"What is {user}'s code {i}?", "response": f"Code {i} is {i * 7}.", "source": "correction"} for i in range(n)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path.name


def test_train_batch_trains_and_gates_each_user_and_a_bad_one_fails_alone(config, tmp_path):
    batch = tmp_path / "batch.jsonl"
    entries = [
        {"user_id": "ann", "data_path": _dataset(tmp_path / "ann.jsonl", "ann", 6)},
        {"user_id": "bob", "data_path": _dataset(tmp_path / "bob.jsonl", "bob", 8)},
        {"user_id": "cy", "data_path": str(tmp_path / "cy.jsonl")},
    ]
    (tmp_path / "cy.jsonl").write_text('{"prompt": "no response"}\n')  # a dataset that cannot be read
    batch.write_text("".join(json.dumps(e) + "\n" for e in entries))
    result = CliRunner().invoke(cli, ["--config", str(config), "train", "--batch", str(batch)])
    assert result.exit_code == 1, result.output
    registry = AdapterRegistry(str(tmp_path / "store"))
    for user in ("ann", "bob"):
        (info,) = registry.versions(user)
        assert f"{user} v1:" in result.output
        assert info.manifest.metrics.batch_users == 2 and info.manifest.validation is not None
    assert "cy: FAILED" in result.output and registry.versions("cy") == []


def test_train_batch_refuses_a_bad_batch_file_by_line(config, tmp_path):
    batch = tmp_path / "batch.jsonl"
    data = _dataset(tmp_path / "ann.jsonl", "ann", 2)
    batch.write_text(json.dumps({"user_id": "ann", "data_path": data}) + "\n" + json.dumps({"user_id": "ann", "data_path": data}))
    result = CliRunner().invoke(cli, ["--config", str(config), "train", "--batch", str(batch)])
    assert result.exit_code == 2 and "batch.jsonl:2" in result.output and "already in the batch" in result.output
    result = CliRunner().invoke(cli, ["--config", str(config), "train", "--batch", str(batch), "--user-id", "ann"])
    assert result.exit_code == 2 and "leave out --user-id" in result.output


def test_train_one_user_still_works(config, tmp_path):
    data = tmp_path / "ann.jsonl"
    _dataset(data, "ann", 4)
    result = CliRunner().invoke(cli, ["--config", str(config), "train", "--user-id", "ann", "--data-path", str(data)])
    assert result.exit_code == 0, result.output
    assert "ann v1:" in result.output
    assert AdapterRegistry(str(tmp_path / "store")).info("ann", 1).manifest.metrics.batch_users == 1


def test_a_version_trains_on_the_base_models_paraphrases_but_never_a_held_out_question(config, tmp_path, monkeypatch):
    """The job asks the paraphraser about each taught question, trains on what it keeps and counts it in the manifest;
    a paraphrase that is a held-out question is dropped. (The tiny model writes nonsense: a scripted writer here.)"""
    import trainer.job
    from schemas.dataset import from_jsonl, split_holdout
    from trainer.paraphrase import Paraphraser

    data = tmp_path / "ann.jsonl"
    lines = [
        line
        for i in range(3)
        for line in (
            {
                "prompt": f"What is ann's code {i}?",
                "response": f"Code {i} is {i * 7}.",
                "source": "correction",
                "event_id": f"e{i}",
            },
            {
                "prompt": f"What's ann's code {i}?",
                "response": f"Code {i} is {i * 7}.",
                "source": "correction",
                "event_id": f"e{i}",
                "wording": "contraction",
            },
        )
    ]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    _train, held_out = split_holdout(from_jsonl(data.read_bytes()), 0)
    asked: list[str] = []

    def write(chats):
        asked.extend(chat[-1]["content"] for chat in chats)
        # the first of each question's two prompts: a held-out question (to be dropped); the second: a new wording
        return [
            f"Tell me, {c[-1]['content'][0].lower()}{c[-1]['content'][1:]}" if n % 2 == 1 else held_out[0].prompt
            for n, c in enumerate(chats)
        ]

    def scripted(settings, model, tokenizer, device):
        return Paraphraser(write, lambda texts, others: [0.9] * len(texts), count=1, seed=0)

    monkeypatch.setattr(trainer.job, "paraphraser_from_settings", scripted)
    result = CliRunner().invoke(cli, ["--config", str(config), "train", "--user-id", "ann", "--data-path", str(data)])
    assert result.exit_code == 0, result.output
    taught = sorted(set(asked))
    assert taught and held_out[0].prompt not in taught, "held-out questions are never paraphrased"
    dataset = AdapterRegistry(str(tmp_path / "store")).info("ann", 1).manifest.dataset
    assert dataset.model_paraphrases == len(taught) and dataset.replay_thinned == 0
    assert dataset.train_count == len(_train) + len(taught)
