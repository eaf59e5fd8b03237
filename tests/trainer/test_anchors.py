"""The anchor set: shipped prompts, cached base answers, mixing into a run."""

from __future__ import annotations

import random

import pytest

from core.settings import shipped_config_dir
from schemas.training import TrainingExample
from trainer.anchors import AnchorMix, AnchorSet, choose_anchor_prompts, mix_anchors, read_prompts
from trainer.gate import load_cases

pytestmark = pytest.mark.unit


def test_shipped_anchor_prompts_are_many_and_disjoint_from_the_core_suite():
    anchors = read_prompts(shipped_config_dir() / "anchor_prompts.txt")
    core = {c.prompt.casefold() for c in load_cases(shipped_config_dir() / "core_suite.jsonl")}
    assert len(anchors) >= 100 and len(set(anchors)) == len(anchors)
    assert not core & {a.casefold() for a in anchors}, "the core suite measures what the anchors protect: never train on it"


def test_choosing_is_seeded_bounded_and_never_contradicts_the_user():
    prompts = [f"General question {i}?" for i in range(40)]
    user = [TrainingExample(prompt="General question 3?", response="My own answer."), TrainingExample(prompt="Q?", response="A.")]
    mix = AnchorMix.from_settings(ratio=2.0, minimum=10, weight=0.5)
    chosen = choose_anchor_prompts(user, prompts, mix, seed=1)
    assert len(chosen) == 10, "at least `minimum`"
    assert "General question 3?" not in chosen, "the user's answer wins"
    assert chosen == choose_anchor_prompts(user, prompts, mix, seed=1) != choose_anchor_prompts(user, prompts, mix, seed=2)
    assert len(choose_anchor_prompts(user * 20, prompts, AnchorMix.from_settings(ratio=1.0, minimum=0), seed=1)) == 39
    assert choose_anchor_prompts(user, prompts, AnchorMix.from_settings(ratio=0.0, minimum=0), seed=1) == []
    anchors = [TrainingExample(prompt=p, response="x", source="anchor") for p in chosen]
    mixed = mix_anchors(user, anchors, mix)
    assert mixed[:2] == user and all(a.source == "anchor" and a.weight == 0.5 for a in mixed[2:])


def test_base_answers_are_generated_when_first_needed_and_cached(tmp_path, monkeypatch):
    import trainer.anchors

    calls = []
    answers = {"Capital of France?": "Paris.", "Say nothing.": "", "Days in a week?": "Seven."}

    limits = []

    def fake_generate(model, tokenizer, device, prompts, max_new_tokens=48, batch_size=16):
        calls.append(list(prompts))
        limits.append(max_new_tokens)
        return [answers[p] for p in prompts]

    monkeypatch.setattr(trainer.anchors, "generate_batch", fake_generate)
    anchor_set = AnchorSet(list(answers), tmp_path, base_sha256="abc")
    first = anchor_set.answers(None, None, "cpu", ["Capital of France?", "Say nothing."])
    assert [(a.prompt, a.response) for a in first] == [("Capital of France?", "Paris.")], "an empty answer is not an example"
    assert calls == [["Capital of France?", "Say nothing."]]
    again = AnchorSet(list(answers), tmp_path, base_sha256="abc")  # another process
    both = again.answers(None, None, "cpu", ["Days in a week?", "Capital of France?"])
    assert [a.response for a in both] == ["Seven.", "Paris."] and calls[-1] == ["Days in a week?"], "only the new prompt"
    AnchorSet(list(answers), tmp_path, base_sha256="other-base").answers(None, None, "cpu", ["Capital of France?"])
    assert calls[-1] == ["Capital of France?"], "keyed by the base model's hash"
    cache = next((tmp_path / "anchors").glob("abc*.jsonl"))
    cache.write_text(cache.read_text() + '{"prompt": "cut sh')  # a crash mid-line
    assert len(AnchorSet(list(answers), tmp_path, base_sha256="abc").answers(None, None, "cpu", ["Capital of France?"])) == 1
    assert set(limits) == {32}, "the default answer length"
    AnchorSet(list(answers), tmp_path, base_sha256="abc", answer_tokens=16).answers(None, None, "cpu", ["Capital of France?"])
    assert limits[-1] == 16 and calls[-1] == ["Capital of France?"], "another length is another cache"


def test_the_nearest_anchors_come_first_then_a_seeded_sample():
    prompts = [
        "What is the capital of Spain?",
        "Where was Mozart born?",
        "How do I bake bread?",
        "What is jazz?",
        "Which company makes the iPhone?",
        "What is a noun?",
        "How do magnets work?",
        "What is rain?",
    ]
    by_topic = {
        "city": ["What is the capital of Spain?", "Where was Mozart born?"],
        "company": ["Which company makes the iPhone?"],
    }

    def nearest_first(queries, candidates):  # stands in for the embedder: city questions are nearest
        return sorted(candidates, key=lambda c: (c not in by_topic["city"], c not in by_topic["company"], c))

    user = [TrainingExample(prompt="Which city was my sister born in?", response="Your sister was born in Ghent.")]
    mix = AnchorMix.from_settings(ratio=4.0, minimum=0, nearest=0.5)
    chosen = choose_anchor_prompts(user, prompts, mix, seed=3, nearest_first=nearest_first)
    assert len(chosen) == 4 and chosen[:2] == by_topic["city"], "half of them the nearest"
    assert len(set(chosen)) == 4 and chosen == choose_anchor_prompts(user, prompts, mix, seed=3, nearest_first=nearest_first)
    rest = [p for p in prompts if p not in by_topic["city"]]
    assert chosen[2:] == random.Random(3).sample(rest, 2), "the rest: a seeded sample of the others"
    assert choose_anchor_prompts(user, prompts, mix, seed=3) == random.Random(3).sample(prompts, 4), "no embedder: all sampled"
    no_facts = choose_anchor_prompts(
        [], prompts, AnchorMix.from_settings(minimum=3, nearest=0.5), seed=3, nearest_first=nearest_first
    )
    assert no_facts == random.Random(3).sample(prompts, 3), "nothing to be near (a user who only rates): the minimum, sampled"


def test_the_embedder_ranks_similar_questions_first(tmp_path):
    from core.settings import load_settings

    anchor_set = AnchorSet(
        ["How do I bake bread?", "What is the capital of Spain?", "What is a noun?"],
        tmp_path,
        "abc",
        load_settings().model.embedding_model,
    )
    ranked = anchor_set.nearest_first(["Which city is the capital of my home country?"], anchor_set.prompts)
    assert ranked[0] == "What is the capital of Spain?" and sorted(ranked) == sorted(anchor_set.prompts)


def test_a_share_of_the_other_anchors_are_the_least_sure_answers():
    prompts = [f"General question {n}?" for n in range(12)]
    unsure = {"General question 7?": 0.01, "General question 2?": 0.02}  # the rest: sure answers

    def least_sure_first(candidates):  # stands in for the base model's margins
        return sorted(candidates, key=lambda c: unsure.get(c, 1.0))

    facts = [TrainingExample(prompt="What is my cat called?", response="Your cat is called Pixel.")]
    mix = AnchorMix.from_settings(minimum=4, nearest=0.0, least_sure=0.5)
    chosen = choose_anchor_prompts(facts, prompts, mix, seed=3, least_sure_first=least_sure_first)
    assert chosen[:2] == ["General question 7?", "General question 2?"], "half of them the least sure"
    rest = [p for p in prompts if p not in unsure]
    assert chosen[2:] == random.Random(3).sample(rest, 2), "the rest: a seeded sample of the others"
    assert chosen == choose_anchor_prompts(facts, prompts, mix, seed=3, least_sure_first=least_sure_first)
    off = AnchorMix.from_settings(minimum=4, nearest=0.0, least_sure=0.0)
    sample = random.Random(3).sample(prompts, 4)
    assert choose_anchor_prompts(facts, prompts, off, seed=3, least_sure_first=pytest.fail) == sample, (
        "share 0: the margins are never asked for"
    )
    assert choose_anchor_prompts([], prompts, mix, seed=3, least_sure_first=pytest.fail) == sample, (
        "a run that teaches no facts (ratings only) keeps a seeded sample"
    )


def test_answer_margins_are_the_smallest_top_two_gap_along_the_answer(tiny_model_dir, tmp_path):
    import torch

    from trainer.anchors import answer_margins
    from trainer.data import collate, tokenize
    from trainer.generation import pad_id
    from trainer.model import BaseModelRef, load_base

    model, tokenizer, device = load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")
    examples = [
        TrainingExample(prompt="What is the capital of Spain?", response="Madrid."),
        TrainingExample(prompt="Name a colour.", response="Blue, or green, or any other colour you like."),
    ]
    margins = answer_margins(model, tokenizer, device, examples, batch_size=1)
    for example, margin in zip(examples, margins, strict=True):  # each row alone, computed the plain way
        ids, mask, labels, _ = collate(tokenize(tokenizer, [example], 512), pad_id(tokenizer), device)
        with torch.no_grad():
            top2 = model(input_ids=ids, attention_mask=mask).logits[0, :-1].topk(2, dim=-1).values
        gaps = (top2[:, 0] - top2[:, 1])[labels[0, 1:] != -100]
        assert margin == pytest.approx(float(gaps.min()), abs=1e-5) and margin >= 0
    assert answer_margins(model, tokenizer, device, examples, batch_size=2) == pytest.approx(margins, abs=1e-4), (
        "padding in a batch changes no row's margin"
    )

    anchor_set = AnchorSet([e.prompt for e in examples], tmp_path, "abc", answer_tokens=8)
    ranked = anchor_set.least_sure_first(model, tokenizer, device, anchor_set.prompts)
    assert sorted(ranked) == sorted(anchor_set.prompts)
    answered = anchor_set.answers(model, tokenizer, device, ranked)
    assert answer_margins(model, tokenizer, device, answered) == sorted(answer_margins(model, tokenizer, device, answered))


def test_a_run_teaching_facts_mixes_in_the_least_sure_anchors_and_a_ratings_only_run_a_sample(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The job's own path (`JobRunner._with_anchors`): at share 1.0 a user who teaches a fact gets the least sure
    anchors; a user who only rates keeps the seeded sample."""
    import trainer.anchors
    from trainer.job import JobRunner
    from trainer.model import BaseModelRef, load_base
    from trainer.train import TrainConfig

    model, tokenizer, device = load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")
    base_answers = {  # the tiny model's own answers are empty: its margins are taken along these
        "What is the capital of Spain?": "Madrid.",
        "Name a colour.": "Blue, or green, or any other colour you like.",
        "How many legs does a cat have?": "Four legs, like most cats and dogs.",
        "Say hello.": "Hello!",
        "Why?": "Because it is so, and for no other reason at all.",
    }
    monkeypatch.setattr(trainer.anchors, "generate_batch", lambda m, t, d, prompts, *a, **k: [base_answers[p] for p in prompts])
    prompts = list(base_answers)
    anchor_set = AnchorSet(prompts, tmp_path, "abc", answer_tokens=8)
    mix = AnchorMix.from_settings(minimum=2, nearest=0.0, least_sure=1.0)
    runner = JobRunner(None, None, model, tokenizer, device, TrainConfig.from_settings(), None, anchor_set, mix)
    fact = TrainingExample(prompt="What is my cat called?", response="Your cat is called Pixel.", source="correction")
    rated = [TrainingExample(prompt="Tell me a story.", response="Once.", rating=1.0, source="rating")]
    least_sure = anchor_set.least_sure_first(model, tokenizer, device, prompts)[:2]
    sample = random.Random(runner.cfg.seed).sample(prompts, 2)
    assert least_sure != sample, "the two choices differ, so the test tells them apart"

    mixed = runner._with_anchors([fact, *rated])
    assert mixed[:2] == [fact, *rated]
    assert [a.prompt for a in mixed[2:]] == least_sure
    assert all(a.source == "anchor" and a.weight == mix.weight for a in mixed[2:])
    only_rated = runner._with_anchors(rated)
    assert [a.prompt for a in only_rated[1:]] == sample, "no facts: the seeded sample"


def test_the_certainty_ranking_is_cached_per_base_model(tmp_path, monkeypatch):
    """A trainer process ranks the anchor prompts once per base model, not once per start: the margins are kept
    beside the cached answers; a line cut short by a crash is ranked again, another base model ranks afresh."""
    import trainer.anchors

    answers = {"Say hello.": "Hello!", "Name a colour.": "Blue, or green.", "Why?": "Because it is so, and for no reason."}
    monkeypatch.setattr(trainer.anchors, "generate_batch", lambda m, t, d, prompts, *a, **k: [answers[p] for p in prompts])
    ranked_by_model: list[list[str]] = []

    def margins(model, tokenizer, device, examples):  # stands in for the base model: longer answers, surer
        ranked_by_model.append([e.prompt for e in examples])
        return [float(len(e.response)) for e in examples]

    monkeypatch.setattr(trainer.anchors, "answer_margins", margins)
    prompts = list(answers)
    ranked = AnchorSet(prompts, tmp_path, "abc", answer_tokens=8).least_sure_first(None, None, None, prompts)
    assert ranked == ["Say hello.", "Name a colour.", "Why?"] and ranked_by_model == [prompts]

    again = AnchorSet(prompts, tmp_path, "abc", answer_tokens=8)
    assert again.least_sure_first(None, None, None, list(reversed(prompts))) == ranked
    assert len(ranked_by_model) == 1, "the next process reads the ranking instead of taking it again"

    margins_file = again.margins_file
    lines = margins_file.read_text(encoding="utf-8").splitlines()
    margins_file.write_text("\n".join(lines[:-1] + [lines[-1][:12]]) + "\n", encoding="utf-8")  # the last line cut short
    assert AnchorSet(prompts, tmp_path, "abc", answer_tokens=8).least_sure_first(None, None, None, prompts) == ranked
    assert ranked_by_model[1:] == [["Why?"]], "only the prompt whose line was cut is ranked again"

    AnchorSet(prompts, tmp_path, "other-base", answer_tokens=8).least_sure_first(None, None, None, prompts)
    assert ranked_by_model[2:] == [prompts], "another base model's answers are ranked afresh"
