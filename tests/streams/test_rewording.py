"""Augmentation that rewords the question itself: the rules, determinism, and a held-out kind never trained on."""

from __future__ import annotations

import pytest

from schemas.dataset import example_pair, split_holdout
from schemas.training import TrainingExample
from streams.curation import TEMPLATES_WITHOUT_REWORDINGS, augment, chosen_rewordings
from streams.rewording import reworded_answers, rewordings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("What is my cat called?", ("contraction", "What's my cat called?")),
        ("What is my cat called?", ("name", "What is the name of my cat?")),
        ("What is my dog's name?", ("name", "What is my dog called?")),
        ("What did I name my boat?", ("name", "What is my boat called?")),
        ("Which city do I live in?", ("which-what", "What city do I live in?")),
        ("Which company does my brother work for?", ("indirect", "Tell me which company my brother works for.")),
        ("Which city was my mother born in?", ("indirect", "Do you know which city my mother was born in?")),
        ("What did I name my boat?", ("indirect", "Tell me what I named my boat.")),
        ("What is my manager's name?", ("synonym", "What is my boss's name?")),
        ("What is the colour of my door?", ("possessive", "What is my door's colour?")),
        ("What is my favourite colour?", ("synonym", "What is my favourite color?")),
        ("Which town do I work in?", ("wh-word", "Where do I work?")),
        ("What is my dentist's name?", ("wh-word", "Who is my dentist?")),
        ("Which club does my son play for?", ("wh-word", "Who does my son play for?")),
        ("What bike do I ride?", ("wh-word", "What do I ride?")),
        ("What bike do I ride?", ("nominal", "What is my bike?")),
        ("Which school does my daughter go to?", ("nominal", "What is my daughter's school?")),
        ("Where was my father born?", ("nominal", "What is my father's birthplace?")),
        ("Where was my father born?", ("indirect", "Tell me where my father was born.")),
        ("What is my favourite song?", ("nominal", "Which song do I like best?")),
        ("What is my door code?", ("short", "My door code?")),
    ],
)
def test_rules_reword_the_question_itself(question, expected):
    assert expected in rewordings(question)


def test_the_born_rule_keeps_the_questions_verb_and_leaves_a_plain_where_alone():
    assert ("wh-word", "Where were you born?") in rewordings("Which city were you born in?")
    assert ("wh-word", "Where was my aunt born?") in rewordings("Which town was my aunt born in?")
    assert [text for kind, text in rewordings("Where were you born?") if kind == "wh-word"] == [], "nothing to fold"


def test_rewordings_differ_from_the_question_and_each_other():
    found = [text for _, text in rewordings("What is my cat called?")]
    assert "What is my cat called?" not in found and len(found) == len({t.casefold() for t in found}) >= 5


def test_reworded_answers_keep_the_key_words():
    assert reworded_answers("Your cat is called Pixel.") == ["It's Pixel.", "Pixel."]
    assert reworded_answers("Fact 6 is true.") == [], "the subject is part of the fact: left alone"
    assert reworded_answers("You were born in Tromsø.") == []


FACTS = [
    TrainingExample(prompt="What is my cat called?", response="Your cat is called Pixel.", event_id="e1", source="correction"),
    TrainingExample(prompt="Which city do I live in?", response="You live in Dundee.", event_id="e2", source="correction"),
    TrainingExample(prompt="What is my favourite food?", response="Your favourite food is ramen.", event_id="e3"),
]


def test_augmentation_is_deterministic_for_a_seed_and_varies_with_it():
    assert augment(FACTS, 2, seed=7, reworded=4) == augment(FACTS, 2, seed=7, reworded=4)
    assert augment(FACTS, 2, seed=7, reworded=4) != augment(FACTS, 2, seed=8, reworded=4)
    assert augment(FACTS, 2, seed=7) == augment(FACTS, 2, seed=7, reworded=0), "no rewordings: the templates as before"
    assert all(e.wording is None for e in augment(FACTS, 0, seed=7))


def test_rewordings_spread_over_kinds_before_repeating_one():
    kinds = [kind for kind, _ in chosen_rewordings("What is my manager's name?", 4, seed=0)]
    assert len(set(kinds)) == 4 and set(kinds) <= {"contraction", "indirect", "name", "synonym", "wh-word", "short"}
    kinds = [kind for kind, _ in chosen_rewordings("What is my cat called?", 4, seed=0)]  # 3 kinds: one repeats
    assert len(kinds) == 4 and set(kinds) == {"contraction", "indirect", "name"}


@pytest.mark.parametrize("templates", [0, 2])
@pytest.mark.parametrize("seed", range(6))
def test_the_held_out_kind_never_reaches_training(seed, templates):
    examples = augment(FACTS, templates, seed=seed, reworded=8)
    train, test = split_holdout(examples, seed=seed)
    assert len(test) == len(FACTS), "one held-out rewording per fact"
    for held in test:
        assert held.wording not in (None, "template"), "held out: a rewording of the question, not a template"
        same_fact = [e for e in train if e.event_id == held.event_id]
        assert held.wording not in {e.wording for e in same_fact}, "no paraphrase of the held-out kind is trained on"
        assert held.response == next(e.response for e in examples if e.event_id == held.event_id), "judged on the answer taught"
    assert not {example_pair(e) for e in test} & {example_pair(e) for e in train}
    assert not {e.prompt.casefold() for e in test} & {e.prompt.casefold() for e in train}
    originals = {e.prompt for e in FACTS}
    assert originals <= {e.prompt for e in train}, "the question as asked is always trained on"


def test_a_question_the_rules_reword_in_fewer_than_two_kinds_gets_templates():
    router = TrainingExample(prompt="How do I reset the router?", response="Hold the reset button 10 s.", event_id="e9")
    assert rewordings(router.prompt) == []
    copies = augment([router], 0, seed=7, reworded=8)[1:]
    assert len(copies) == TEMPLATES_WITHOUT_REWORDINGS and {c.wording for c in copies} == {"template"}
    train, test = split_holdout(augment([router], 0, seed=7, reworded=8), seed=7)
    assert len(test) == 1 and router in train
    assert augment([router], 0, seed=7, reworded=0) == [router], "augmentation off: nothing added"
    cat = FACTS[0]
    assert all(c.wording != "template" for c in augment([cat], 0, seed=7, reworded=8)[1:]), "rules found: no templates"
    one_kind = TrainingExample(prompt="What is fact 6?", response="Fact 6 is true.", event_id="e8")
    assert {kind for kind, _ in rewordings(one_kind.prompt)} == {"contraction"}
    train, test = split_holdout(augment([one_kind], 0, seed=7, reworded=8), seed=7)
    assert [e.wording for e in test] == ["contraction"], "the one kind is held out"
    assert sorted(e.wording or "asked" for e in train) == ["asked", "template", "template"], "templates beside it"
