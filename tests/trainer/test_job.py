"""The job's own pieces: the shrink step's fact rule, the replay a run trains on and the progress lines."""

from __future__ import annotations

import logging

import pytest

from schemas.training import TrainingExample
from trainer.job import FactCheck, no_fact_lost, progress_log, replay_to_train
from trainer.train import StepReport

pytestmark = pytest.mark.unit


def test_a_shrunk_update_may_not_lose_a_fact_the_trained_one_answers():
    trained = [True, False, True]  # one held-out paraphrase never learned
    assert no_fact_lost([True, False, True], trained)
    assert no_fact_lost([True, True, True], trained)
    assert not no_fact_lost([True, False, False], trained)
    # Without an epoch check to compare with (early stopping off), every case must be answered.
    assert no_fact_lost([True, True], []) and not no_fact_lost([True, False], [])


class _WordTokenizer:
    def __call__(self, text):
        return type("Encoded", (), {"input_ids": text.split()})()


def test_an_update_that_never_answered_every_fact_is_kept_as_trained():
    held_out = [
        TrainingExample(prompt="Which cat is mine?", response="Your cat is called Pixel."),
        TrainingExample(prompt="Where do I live?", response="You live in Dundee."),
    ]
    check = FactCheck(_WordTokenizer(), "cpu", "ana", held_out, previous=[], min_epochs=1)
    half = ["Your cat is called Pixel.", "I don't know."]
    assert not check.epoch_judged(8, half) and not check.learned_every_fact()
    assert not check.scale_judged(0.5, half), "it answers what the trained update answered, yet it is not shrunk"
    both = ["Your cat is called Pixel.", "You live in Dundee."]
    assert check.epoch_judged(3, both) and check.learned_every_fact()
    assert check.scale_judged(0.5, both) and not check.scale_judged(0.5, half)


def test_progress_lines_show_the_user_loss_and_the_anchor_kl_apart(caplog):
    update = progress_log("ana")
    with caplog.at_level(logging.INFO, logger="adaptloop.trainer"):
        for step in range(1, 11):
            update(StepReport(step, 10, 0.5, 0.25 if step != 5 else None, 0.0625))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "training ana: step 1/10, loss 0.500, user loss 0.250, anchor KL 0.0625"
    assert lines[4] == "training ana: step 5/10, loss 0.500, anchor KL 0.0625", "a batch of anchors only has no user loss"
    assert len(lines) == 10


def test_replay_is_thinned_on_a_warm_start_and_kept_whole_from_zero():
    new = [TrainingExample(prompt="Which cat is mine?", response="Your cat is called Pixel.")]
    replay = [
        TrainingExample(prompt=f"{form} do I live?", response="You live in Dundee.", source="replay")
        for form in ("Where", "In which town", "Tell me where")
    ]
    assert replay_to_train(new + replay, 2, warm=True) == new + replay[:2], "the active adapter knows them: reminders"
    assert replay_to_train(new + replay, 2, warm=False) == new + replay, "from zero (another LoRA shape): every one"
