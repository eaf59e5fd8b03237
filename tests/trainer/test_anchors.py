"""The anchor set: shipped prompts, cached base answers, mixing into a run."""

from __future__ import annotations

import pytest

from adaptloop.settings import shipped_config_dir
from schemas.training import TrainingExample
from trainer.anchors import AnchorMix, load_anchor_answers, mix_anchors, read_prompts
from trainer.gate import load_cases

pytestmark = pytest.mark.unit


def test_shipped_anchor_prompts_are_many_and_disjoint_from_the_core_suite():
    anchors = read_prompts(shipped_config_dir() / "anchor_prompts.txt")
    core = {c.prompt.casefold() for c in load_cases(shipped_config_dir() / "core_suite.jsonl")}
    assert len(anchors) >= 100 and len(set(anchors)) == len(anchors)
    assert not core & {a.casefold() for a in anchors}, "the core suite measures what the anchors protect: never train on it"


def _anchors(n: int) -> list[TrainingExample]:
    return [TrainingExample(prompt=f"General question {i}?", response=f"Answer {i}.", source="anchor") for i in range(n)]


def test_mixing_is_seeded_bounded_and_never_contradicts_the_user():
    user = [TrainingExample(prompt="General question 3?", response="My own answer."), TrainingExample(prompt="Q?", response="A.")]
    mixed = mix_anchors(user, _anchors(40), AnchorMix(ratio=2.0, minimum=10, weight=0.5), seed=1)
    added = mixed[len(user) :]
    assert mixed[: len(user)] == user and len(added) == 10, "at least `minimum`"
    assert all(a.source == "anchor" and a.weight == 0.5 for a in added)
    assert "General question 3?" not in {a.prompt for a in added}, "the user's answer wins"
    assert mixed == mix_anchors(user, _anchors(40), AnchorMix(ratio=2.0, minimum=10, weight=0.5), seed=1)
    assert len(mix_anchors(user * 20, _anchors(40), AnchorMix(ratio=1.0, minimum=0), seed=1)) == 40 + 39
    assert mix_anchors(user, _anchors(40), AnchorMix(ratio=0.0, minimum=0), seed=1) == user


def test_base_answers_are_generated_once_and_cached(tmp_path, monkeypatch):
    import trainer.train

    calls = []

    def fake_generate(model, tokenizer, device, prompts, max_new_tokens=48, batch_size=16):
        calls.append(list(prompts))
        return ["Paris.", "", "Seven."][: len(prompts)]

    monkeypatch.setattr(trainer.train, "generate_batch", fake_generate)
    prompts = ["Capital of France?", "Say nothing.", "Days in a week?"]
    first = load_anchor_answers(None, None, "cpu", prompts, tmp_path, base_sha256="abc")
    assert [(a.prompt, a.response) for a in first] == [("Capital of France?", "Paris."), ("Days in a week?", "Seven.")]
    assert load_anchor_answers(None, None, "cpu", prompts, tmp_path, base_sha256="abc") == first and len(calls) == 1
    load_anchor_answers(None, None, "cpu", prompts, tmp_path, base_sha256="other-base")
    assert len(calls) == 2, "keyed by the base model's hash"
