"""Curation rules, paraphrasing and dedupe: plain functions, no Kafka."""

from __future__ import annotations

import pytest

from core.settings import CurationSettings
from schemas.events import ConceptGap, ConversationTurn, Feedback, IntentTrace
from schemas.training import Provenance, TrainingExample
from streams.curation import augment, curate, dedupe, paraphrases

pytestmark = pytest.mark.unit

CFG = CurationSettings(confidence_weighting=True)
BASE = {"event_id": "e1", "user_id": "alice", "timestamp": "2026-01-01T00:00:00Z"}
PROV = Provenance(topic="t", partition=0, offset=7)


def test_missed_intent_with_resolution_is_an_example_and_a_gap():
    out = curate(IntentTrace(**BASE, intent="i", status="missed", query="Q?", resolution="A.", confidence=1.0), PROV, CFG)
    assert out.gap == "missed_intent" and out.outcome is False
    (ex,) = out.examples
    assert (ex.prompt, ex.response, ex.source, ex.weight, ex.provenance) == ("Q?", "A.", "intent", 1.5, PROV)


def test_missed_intent_without_resolution_is_only_a_gap_and_confidence_scales_weight():
    out = curate(IntentTrace(**BASE, intent="i", status="abandoned", query="Q?"), PROV, CFG)
    assert out.gap == "missed_intent" and out.examples == ()
    low = curate(IntentTrace(**BASE, intent="i", status="missed", query="Q?", resolution="A.", confidence=0.0), PROV, CFG)
    assert low.examples[0].weight == pytest.approx(0.75)
    assert curate(IntentTrace(**BASE, intent="i", status="satisfied", query="Q?"), PROV, CFG).outcome is True
    assert curate(IntentTrace(**BASE, intent="i", status="open", query="Q?"), PROV, CFG) == curate(
        IntentTrace(**BASE, intent="j", status="open", query="R?"), PROV, CFG
    )


def test_feedback_rules():
    corr = curate(Feedback(**BASE, kind="correction", query="Q?", response="bad", correction="good"), PROV, CFG)
    assert corr.gap == "correction" and corr.examples[0].response == "good" and corr.examples[0].weight == 2.0
    assert corr.examples[0].rejected == "bad"  # a preference pair: the correction is preferred to the answer given
    neg = curate(Feedback(**BASE, kind="rating", query="Q?", response="bad", rating=1, rating_scale="stars"), PROV, CFG)
    assert neg.gap == "negative_rating"
    assert [(e.prompt, e.response, e.source, e.rating) for e in neg.examples] == [("Q?", "bad", "rating", -1.0)]
    pos = curate(Feedback(**BASE, kind="rating", query="Q?", response="ok", rating=5), PROV, CFG)
    assert pos.gap is None and pos.boost_prompt == "Q?" and pos.outcome is True
    assert [(e.response, e.source, e.rating) for e in pos.examples] == [("ok", "rating", 1.0)]


def test_conversation_rules():
    good = curate(ConversationTurn(**BASE, session_id="s", question="Q?", answer="A.", rating=1), PROV, CFG)
    unrated = curate(ConversationTurn(**BASE, session_id="s", question="Q?", answer="A."), PROV, CFG)
    bad = curate(ConversationTurn(**BASE, session_id="s", question="Q?", answer="A.", rating=-1), PROV, CFG)
    assert good.examples[0].weight == 1.0 and unrated.examples[0].weight == 0.5
    assert bad.gap == "negative_rating" and [(e.source, e.rating) for e in bad.examples] == [("rating", -1.0)]
    assert good.examples[0].rating == 1.0 and unrated.examples[0].rating is None


def test_concept_gaps_for_users_and_the_global_pool():
    gap = ConceptGap(**BASE, concept="LoRA", related=["PEFT", "Adapters"], description="Low-rank adaptation.")
    out = curate(gap, PROV, CFG)
    assert out.gap == "concept_gap" and not out.to_global
    assert [e.prompt for e in out.examples] == [
        "What is LoRA?",
        "How is LoRA related to PEFT?",
        "How is LoRA related to Adapters?",
    ]
    glob = curate(gap.model_copy(update={"user_id": "global"}), PROV, CFG)
    assert glob.to_global and glob.gap is None and {e.source for e in glob.examples} == {"global"}


def test_paraphrases_are_deterministic_distinct_and_configurable():
    a = paraphrases("What is my dog's name?", 3, seed=1)
    assert a == paraphrases("What is my dog's name?", 3, seed=1)
    assert len(set(a)) == 3 and "What is my dog's name?" not in a
    assert paraphrases("What is my dog's name?", 0, seed=1) == []
    assert a != paraphrases("What is my dog's name?", 3, seed=2)


def test_augment_then_dedupe():
    ex = TrainingExample(prompt="Q?", response="A.", weight=1.0, event_id="e1")
    out = augment([ex, ex.model_copy(update={"weight": 3.0})], n=2, seed=1)
    assert len(out) == 6
    kept = dedupe(out)
    assert len(kept) == 3 and all(e.weight == 3.0 for e in kept)


def test_redaction_cleans_examples_and_the_thumbs_up_prompt_alike():
    from core.redaction import DISABLED, Redactor
    from streams.curation import redact_curated

    query = "Is my card 4111 1111 1111 1111 on file for ana@example.org?"
    corr = curate(Feedback(**BASE, kind="correction", query=query, response="no", correction="Call +1 650-253-0000."), PROV, CFG)
    clean, found = redact_curated(corr, Redactor())
    assert clean.examples[0].prompt == "Is my card <CARD> on file for <EMAIL>?"
    assert clean.examples[0].response == "Call <PHONE>." and found == {"CARD": 1, "EMAIL": 1, "PHONE": 1}
    thumbs_up = curate(Feedback(**BASE, kind="rating", query=query, response="ok", rating=5), PROV, CFG)
    assert redact_curated(thumbs_up, Redactor())[0].boost_prompt == clean.examples[0].prompt, "boosts find the redacted prompt"
    assert redact_curated(corr, DISABLED) == (corr, {})


def test_redaction_cleans_a_kept_question_and_copies_nothing_without_personal_data():
    from core.redaction import Redactor
    from streams.curation import redact_curated

    missed = curate(IntentTrace(**BASE, intent="i", status="missed", query="Mail ana@example.org?"), PROV, CFG)
    clean, found = redact_curated(missed, Redactor())
    assert clean.asked.question == "Mail <EMAIL>?" and found == {"EMAIL": 1}
    assert missed.asked.question == "Mail ana@example.org?", "the curated event itself is left as it was"
    plain = curate(IntentTrace(**BASE, intent="i", status="missed", query="Which mail?"), PROV, CFG)
    assert redact_curated(plain, Redactor()) == (plain, {}) and redact_curated(plain, Redactor())[0] is plain


def test_redaction_cleans_the_answer_a_correction_replaced():
    from core.redaction import Redactor
    from streams.curation import redact_curated

    given = "I have ana@example.org on file for you."
    corr = curate(Feedback(**BASE, kind="correction", query="Which mail?", response=given, correction="The work one."), PROV, CFG)
    clean, found = redact_curated(corr, Redactor())
    assert clean.examples[0].rejected == "I have <EMAIL> on file for you." and found == {"EMAIL": 1}
    assert clean.examples[0].prompt == "Which mail?" and clean.resolved == "Which mail?"
