"""The base model's paraphrases of taught questions: filtered, deterministic, never a held-out question."""

from __future__ import annotations

import re

import pytest

from schemas.training import TrainingExample
from trainer.paraphrase import (
    ParaphraseFilter,
    Paraphraser,
    cleaned,
    few_shot_messages,
    in_asker_person,
)


def words_overlap(texts: list[str], others: list[str]) -> list[float]:
    """A stand-in for sentence similarity: the share of words two questions have in common (Jaccard)."""

    def words(text: str) -> set[str]:
        return set(re.findall(r"[a-z']+", text.casefold()))

    return [len(words(a) & words(b)) / len(words(a) | words(b)) for a, b in zip(texts, others)]


def scripted(rewrites: dict[str, list[str]]):
    """A writer that answers each few-shot chat with the next scripted rewrite of its last question."""
    given: dict[str, int] = {}

    def write(chats: list[list[dict[str, str]]]) -> list[str]:
        out = []
        for chat in chats:
            question = chat[-1]["content"]
            n = given.get(question, 0)
            given[question] = n + 1
            options = rewrites.get(question, [])
            out.append(options[n] if n < len(options) else question)
        return out

    return write


CAT = "What is my cat called?"
HELD_OUT = "What is the name of my cat?"
REWRITES = {
    CAT: [
        "What is the name of my cat?",  # the held-out question itself
        "What is the name of my cat then?",  # next to it
        "Sure! Your cat is called Pixel.",  # an answer, not a question
        "What is your cat called today?",  # the wrong person, turned back
        "Which team do I support?",  # a rewrite of another question
        "What do I call my cat?",
    ],
}


def paraphraser(count: int = 2, rewrites=None) -> Paraphraser:
    keep = ParaphraseFilter(min_similarity=0.3, leak_similarity=0.7)
    return Paraphraser(scripted(rewrites or REWRITES), words_overlap, count, seed=0, keep=keep)


def test_only_close_new_questions_in_the_askers_person_are_kept_and_none_near_a_held_out_one():
    chosen = paraphraser(count=4).paraphrases([CAT], avoid=[], held_out=[HELD_OUT])
    assert chosen == {CAT: ["What is my cat called today?", "What do I call my cat?"]}


def test_augment_follows_each_taught_question_with_its_paraphrases_and_leaves_copies_alone():
    taught = TrainingExample(prompt=CAT, response="Your cat is called Pixel.", source="correction", event_id="e1")
    template = taught.model_copy(update={"prompt": f"Quick question: {CAT}", "wording": "template"})
    held = taught.model_copy(update={"prompt": HELD_OUT, "wording": "name"})
    out = paraphraser(count=2).augment([taught, template], [held])
    assert [(e.prompt, e.wording) for e in out] == [
        (CAT, None),
        ("What is my cat called today?", "model"),
        (template.prompt, "template"),
    ]
    assert out[1].response == taught.response and out[1].event_id == "e1" and out[1].source == "correction"
    assert all(e.prompt != HELD_OUT for e in out)


def test_the_same_seed_writes_the_same_prompts_and_another_seed_other_examples():
    assert few_shot_messages(CAT, 0, 1) == few_shot_messages(CAT, 0, 1)
    assert few_shot_messages(CAT, 0, 0) != few_shot_messages(CAT, 0, 1)
    assert [few_shot_messages(CAT, s, 0) for s in range(4)] != [few_shot_messages(CAT, 0, 0)] * 4
    first, second = paraphraser().paraphrases([CAT], [], [HELD_OUT]), paraphraser().paraphrases([CAT], [], [HELD_OUT])
    assert first == second


def test_no_paraphrases_when_off():
    assert paraphraser(count=0).paraphrases([CAT], [], []) == {}


@pytest.mark.parametrize(
    ("question", "rewrite", "expected"),
    [
        ("Which bus do I take?", "What bus do you take?", "What bus do I take?"),
        ("What is my cat called?", "What is your cat's name?", "What is my cat's name?"),
        ("Where am I from?", "Where are you from?", "Where am I from?"),
        ("What is my cat called?", "What is the cat you told me about?", None),  # a "you" no rule turns back
        ("What do you think of Paris?", "How do you like Paris?", "How do you like Paris?"),  # asked in the second person
    ],
)
def test_a_rewrite_is_turned_back_to_the_askers_person(question, rewrite, expected):
    assert in_asker_person(question, rewrite) == expected


def test_only_the_first_line_of_a_question_is_taken():
    assert cleaned(CAT, 'Rewritten: "What do I call my cat?"\n\nQuestion: Where do I live?') == "What do I call my cat?"
    assert cleaned(CAT, "Pixel.") is None and cleaned(CAT, "") is None and cleaned(CAT, "Cat?") is None


@pytest.mark.slow
def test_the_default_model_writes_close_paraphrases_deterministically():
    """The real writer and embedder: each paraphrase is new, close in meaning, and the same on a second run."""
    from core.settings import defaults
    from trainer.model import load_base, resolve_base_model
    from trainer.scoring import load_embedder

    settings = defaults()
    base = resolve_base_model(settings.model.base_model, settings.model.gguf_file, settings.cache_dir)
    model, tokenizer, device = load_base(base, settings.model.dtype)
    embedder = load_embedder(settings.model.embedding_model)
    questions = ["What is my dentist called?", "Which city do I live in?", "What is my locker number?"]
    held_out = ["What's my locker number?"]
    writer = Paraphraser.on_model(model, tokenizer, device, embedder.similarity, count=2, seed=0)
    chosen = writer.paraphrases(questions, [], held_out)
    assert sum(map(len, chosen.values())) >= 2, chosen
    for question, texts in chosen.items():
        assert all(t.casefold() != question.casefold() and t not in held_out for t in texts)
        assert min(embedder.similarity(texts, [question] * len(texts))) >= 0.8
    assert writer.paraphrases(questions, [], held_out) == chosen
