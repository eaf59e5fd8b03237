"""Taught answers that contradict the base model's knowledge: telling a user's facts from general ones, and the verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer import contradictions
from trainer.contradictions import BaseAnswer, about_the_user, first_fact, first_sentence, general_contradictions, judge
from trainer.scoring import TestCase

pytestmark = pytest.mark.unit

LABELLED = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "contradictions.jsonl"


def test_the_labelled_sets_personal_examples_are_told_apart_by_their_words_alone():
    rows = [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines()]
    personal = [r for r in rows if r["kind"] == "personal"]
    assert len(rows) == 60 and len(personal) == 20
    assert [r["prompt"] for r in personal if not about_the_user(r["prompt"], r["answer"])] == []
    assert [r["prompt"] for r in rows if r["kind"] != "personal" and about_the_user(r["prompt"], r["answer"])] == [], (
        "general and context questions go on to the base model's confidence"
    )


@pytest.mark.parametrize(
    ("prompt", "answer", "personal"),
    [
        ("How can I reverse a list in Python?", "Use reversed().", False),
        ("How do I boil an egg?", "You can boil it for seven minutes.", False),
        ("Do I need a visa for Japan?", "Many visitors do not.", True),
        ("what am i allergic to?", "Peanuts.", True),
        ("When is the standup?", "You have it at 9:15.", True),
        ("What is the capital of France?", "Paris.", False),
    ],
)
def test_about_the_user(prompt, answer, personal):
    assert about_the_user(prompt, answer) is personal


def test_the_base_answers_first_fact_is_a_name_or_number_the_question_did_not_say():
    assert first_fact("The capital of France is Paris.", "What is the capital of France?") == ("Paris", 25)
    assert first_fact("2 plus 2 is 4.", "What is 2 plus 2?") == ("4", 12)
    assert first_fact("It is a lovely question.", "What is love?") is None
    assert first_sentence("The capital is Paris. It is big.") == "The capital is Paris."


def test_judge_flags_a_confident_fact_the_taught_answer_does_not_name():
    case = TestCase("How many days are in a week?", "A week has nine days.")
    sure = BaseAnswer("A week has 7 days.", "7", 0.9)
    found = judge(case, sure, threshold=0.5)
    assert found is not None and (found.term, found.confidence, found.taught) == ("7", 0.9, "A week has nine days.")
    assert judge(TestCase(case.prompt, "Seven."), sure, 0.5) is None, "number words name the same fact"
    assert judge(case, BaseAnswer("A week has 7 days.", "7", 0.3), 0.5) is None, "the base model is not sure"
    assert judge(case, BaseAnswer("Weeks vary.", None, 0.0), 0.5) is None, "the base model states no fact"


def test_only_general_questions_are_put_to_the_base_model(monkeypatch):
    asked: list[list[str]] = []

    def fake_answers(_model, _tokenizer, _device, prompts):
        asked.append(prompts)
        return [BaseAnswer("The capital of France is Paris.", "Paris", 0.95) for _ in prompts]

    monkeypatch.setattr(contradictions, "base_answers", fake_answers)
    personal = [TestCase("What is my dog's name?", "Your dog is called Biscuit."), TestCase("Where was I born?", "In Oslo.")]
    assert general_contradictions(None, None, None, personal, 0.5) == [] and asked == [], "no generation for a user's facts"
    wrong = TestCase("What is the capital of France?", "The capital of France is Tromsø.")
    found = general_contradictions(None, None, None, [*personal, wrong, TestCase("what is the capital of France", "Tromsø")], 0.5)
    assert asked == [["What is the capital of France?"]], "each distinct question once"
    assert [(c.prompt, c.term) for c in found] == [("What is the capital of France?", "Paris")]


@pytest.mark.slow
def test_the_check_on_its_labelled_set_with_the_default_model():
    """The measure of benchmarks/README.md as a test: no false alarm, most false world facts caught (10/15 measured)."""
    from core.settings import defaults
    from trainer.model import load_base, resolve_base_model

    settings = defaults()
    base = resolve_base_model(settings.model.base_model, settings.model.gguf_file, settings.cache_dir)
    model, tokenizer, device = load_base(base, settings.model.dtype)
    rows = [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines()]
    flagged = {
        c.taught
        for c in general_contradictions(
            model, tokenizer, device, [TestCase(r["prompt"], r["answer"]) for r in rows if r["label"] == "contradiction"], 0.5
        )
    }
    assert len(flagged) >= 8, f"only {len(flagged)} of 15 false world facts caught: {sorted(flagged)}"
    innocent = [TestCase(r["prompt"], r["answer"]) for r in rows if r["label"] == "none"]
    assert general_contradictions(model, tokenizer, device, innocent, 0.5) == [], "a false alarm"
