"""The learning benchmark's rewording measure: the hand-written rewordings stay out of training."""

from __future__ import annotations

import json

import pytest

from benchmarks.learning import REWORDINGS, _never_asked
from schemas.training import TrainingExample
from streams.curation import augment

pytestmark = pytest.mark.unit


def test_a_rule_that_writes_a_hand_written_rewording_does_not_train_it():
    fact = next(json.loads(line) for line in REWORDINGS.read_text(encoding="utf-8").splitlines() if "programming" in line)
    taught = TrainingExample(prompt=fact["question"], response=fact["answer"], event_id="e1", source="correction")
    examples = augment([taught], 2, seed=13, reworded=8)
    asked = {" ".join(text.casefold().split()) for text in fact["rewordings"]}
    assert asked & {e.prompt.casefold() for e in examples}, "a rule writes one of them word for word (the case to guard)"
    kept, removed = _never_asked(examples, [f"  {text.upper()} " for text in fact["rewordings"]])
    assert removed >= 1 and not asked & {" ".join(e.prompt.casefold().split()) for e in kept}
    assert [e for e in examples if e not in kept] == [e for e in examples if e.prompt.casefold() in asked]
