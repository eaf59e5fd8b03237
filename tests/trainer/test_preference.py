"""Preference training: the losses against TRL's values, the objective's data rules, a run that learns a preference,
and the gate's preference suite."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from schemas.dataset import split_holdout
from schemas.manifest import PreferenceCase
from schemas.training import TrainingExample
from tests.support.adapters import manifest, random_adapter
from trainer.data import tokenize
from trainer.gate import Gate, GateConfig
from trainer.generation import pad_id
from trainer.job import validate_adapter
from trainer.model import BaseModelRef, load_base
from trainer.preference import (
    PreferenceLoss,
    answer_tokens,
    dpo_losses,
    held_out_pairs,
    kl_estimate,
    kto_losses,
    preference_accuracy,
    preference_items,
    preference_loss,
    reference_logps,
    sequence_logps,
    supervised,
    uses_preference,
)
from trainer.registry import AdapterRegistry
from trainer.scoring import load_embedder
from trainer.train import TrainConfig, train_adapter

pytestmark = pytest.mark.unit

REFERENCE = json.loads((Path(__file__).parent / "data" / "preference_reference.json").read_text())


def _rated(n: int, rating: float, answer: str | None = None) -> TrainingExample:
    return TrainingExample(
        prompt=f"How far is town {n}?", response=answer or f"Town {n} is {n} km away.", source="rating", rating=rating
    )


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda c: f"beta={c['beta']}")
def test_the_losses_give_trls_values(case):
    """TRL 0.19.1's DPOTrainer.dpo_loss (sigmoid) and KTOTrainer.kto_loss (kto) on a tiny model's sequence
    log-probabilities (recorded by scripts/trl_reference_values.py)."""
    policy, reference, beta = torch.tensor(REFERENCE["policy"]), torch.tensor(REFERENCE["reference"]), case["beta"]
    dpo = dpo_losses(policy[:3], policy[3:], reference[:3], reference[3:], beta)
    assert dpo.tolist() == pytest.approx(case["dpo"], abs=1e-6)
    kl = kl_estimate(policy.roll(1), reference.roll(1))
    assert float(kl) == pytest.approx(case["kto_kl"], abs=1e-6)
    desirable = torch.tensor([True, True, True, False, False, False])
    assert kto_losses(policy, reference, desirable, kl, beta).tolist() == pytest.approx(case["kto"], abs=1e-6)


def test_sequence_logps_are_the_answer_tokens_log_probabilities(tiny):
    model, tokenizer, device = tiny
    examples = [TrainingExample(prompt="Which city?", response="Oslo."), TrainingExample(prompt="Hi?", response="Hello there!")]
    seqs = tokenize(tokenizer, examples, 64)
    with torch.no_grad():
        fast = sequence_logps(model, seqs, pad_id(tokenizer), device)
        for row, seq in enumerate(seqs):
            logits = model(torch.tensor([seq.input_ids])).logits[0, :-1].log_softmax(-1)
            targets = torch.tensor(seq.labels[1:])
            keep = targets != -100
            full = logits[keep].gather(1, targets[keep].unsqueeze(1)).sum()
            assert float(fast[row]) == pytest.approx(float(full), rel=1e-4)


def test_a_disliked_answers_loss_counts_undesirable_weight_times(tiny):
    """KTO's lambda_U: the batch loss is linear in it, and a batch of disliked answers alone is scaled too (the
    examples' own weights normalize a batch, not this scale)."""
    model, tokenizer, device = tiny
    pad = pad_id(tokenizer)
    liked = [_rated(n, 1.0) for n in range(3)]
    disliked = [_rated(n, -1.0, f"Town {n}? I could not say how far that is.") for n in range(3, 6)]
    items = preference_items(tokenizer, liked + disliked, 64)
    reference = reference_logps(model, items, pad, device)
    with torch.no_grad():
        # Away from the reference (its losses all equal there), as after a few steps.
        reference = {key: value - 1.5 * (n % 3) for n, (key, value) in enumerate(reference.items())}
        loss = {
            w: float(preference_loss(model, items, reference, PreferenceLoss(0.5, undesirable_weight=w), pad, device))
            for w in (0, 0.5, 1)
        }
        only_disliked = {
            w: float(preference_loss(model, items[3:], reference, PreferenceLoss(0.5, undesirable_weight=w), pad, device))
            for w in (0.25, 1)
        }
    assert loss[0] > 0 and loss[1] > loss[0], "the disliked answers add to the loss, by their weight"
    assert loss[0.5] == pytest.approx((loss[0] + loss[1]) / 2, rel=1e-5)
    assert only_disliked[0.25] == pytest.approx(only_disliked[1] / 4, rel=1e-5)


def test_per_token_kto_weighs_a_long_answer_moved_as_far_per_token_as_a_short_one(tiny):
    """Length-normalized KTO: liked answers of different lengths whose log-likelihood gained the same per token have
    the same loss; summed, the long one's gain saturates the sigmoid first (its loss is lower)."""
    model, tokenizer, device = tiny
    pad = pad_id(tokenizer)
    answers = ["7 km.", "Town 7 is seven kilometres away by the coast road, a little more by the hills."]
    items = preference_items(tokenizer, [_rated(7, 1.0, answers[0]), _rated(8, 1.0, answers[1])], 64)
    sequences = [s for item in items for s in item.sequences]
    with torch.no_grad():
        logps = sequence_logps(model, sequences, pad, device)
    tokens = answer_tokens(sequences, device)
    # Each answer 0.05 nats per token above its reference; the mismatched answers at theirs (KTO's KL point 0).
    gained = {
        id(s): float(lp) - (0.05 * float(n) if k % 2 == 0 else 0.0) for k, (s, lp, n) in enumerate(zip(sequences, logps, tokens))
    }
    assert int(tokens[2]) > 3 * int(tokens[0]), "the second answer is much longer"
    with torch.no_grad():
        per_token = [float(preference_loss(model, [i], gained, PreferenceLoss(kto_token_beta=10.0), pad, device)) for i in items]
        summed = [float(preference_loss(model, [i], gained, PreferenceLoss(beta=0.5), pad, device)) for i in items]
    assert per_token == pytest.approx([1 - 1 / (1 + math.exp(-0.5))] * 2, abs=1e-4)
    assert summed[1] < summed[0] - 0.05


def test_a_disliked_answer_is_never_a_supervised_target():
    fact = TrainingExample(prompt="My dog?", response="Rex.", source="correction", rejected="I do not know.")
    liked, disliked = _rated(1, 1.0), _rated(2, -1.0)
    assert uses_preference("auto", [fact]) and uses_preference("sft+preference", [liked])
    assert not uses_preference("auto", [TrainingExample(prompt="a", response="b")]) and not uses_preference("sft", [fact])
    assert supervised([fact, liked, disliked], "auto") == [fact], "under preference, rated answers are preference data only"
    assert supervised([fact, liked, disliked], "sft") == [fact, liked], "SFT alone trains on liked answers"


def test_rated_answers_are_held_out_on_both_sides_and_never_trained_on():
    examples = [_rated(n, 1.0) for n in range(8)] + [_rated(n, -1.0, f"Town {n} is far, far away.") for n in range(8, 12)]
    train, test = split_holdout(examples, seed=3)
    assert sorted((e.rating or 0) > 0 for e in test) == [False, True, True], "a quarter of each side, at least one"
    assert not {(e.prompt, e.response) for e in test} & {(e.prompt, e.response) for e in train}
    assert split_holdout(examples, seed=3) == (train, test), "deterministic for a seed"
    assert len(held_out_pairs(test)) == 2, "each liked one against each disliked one"


def _short_and_long(n_users: int = 12) -> list[TrainingExample]:
    """A user who likes short answers and dislikes long ones, rating only."""
    out = []
    for n in range(n_users):
        out.append(_rated(n, 1.0, f"{n} km."))
        out.append(_rated(n, -1.0, f"Well, that depends on the road you take, but town {n} is roughly {n} km away."))
    return out


def test_the_gate_compares_rated_answers_per_token_and_a_corrections_pair_summed(tiny, monkeypatch):
    """A long liked answer that lost a little per token against a short disliked one that lost a lot per token:
    summed, the long one lost more (it looks disliked); per token it is preferred. A correction's pair (one prompt,
    as DPO learns it) is compared summed whichever way rated answers are."""
    model, tokenizer, device = tiny
    long, short = "Town 1 is seven kilometres away by the coast road, a little more by the hills.", "2 mi."

    def logps_with(model, adapter_dir, sequences, tokenizer, device):
        """The reference (no adapter) at 0; the candidate: the longest answer -0.1 nats per token, others -0.4."""
        longest = max(s.answer_length for s in sequences)
        per_token = [-0.1 if s.answer_length == longest else -0.4 for s in sequences]
        return [0.0 if adapter_dir is None else p * s.answer_length for p, s in zip(per_token, sequences)]

    monkeypatch.setattr("trainer.preference._logps_with", logps_with)
    rated = [_rated(1, 1.0, long), _rated(2, -1.0, short)]
    lengths = [s.answer_length for s in tokenize(tokenizer, rated, 512)]
    assert 0.1 * lengths[0] > 0.4 * lengths[1], "summed, the long answer lost more"
    assert preference_accuracy(model, tokenizer, device, "candidate", None, rated, rated_per_token=True) == (1.0, 1)
    assert preference_accuracy(model, tokenizer, device, "candidate", None, rated, rated_per_token=False) == (0.0, 1)
    correction = TrainingExample(prompt="How far is town 1?", response=long, rejected=short, source="correction")
    assert preference_accuracy(model, tokenizer, device, "candidate", None, [correction], rated_per_token=True) == (0.0, 1)


def test_a_version_validated_later_is_judged_as_its_recorded_training_learned_its_rated_answers(tiny, tmp_path, monkeypatch):
    """A validate command under today's setting (per token) judges a version trained with summed KTO summed, and one
    whose manifest records no `preference_kto_token_beta` (trained before per-token KTO) summed too."""
    model, tokenizer, device = tiny

    def logps_with(model, adapter_dir, sequences, tokenizer, device):
        """As above: the candidate loses 0.1 nats per token on the long (liked) answer, 0.4 on the short one."""
        longest = max(s.answer_length for s in sequences)
        return [
            0.0 if adapter_dir is None else (-0.1 if s.answer_length == longest else -0.4) * s.answer_length for s in sequences
        ]

    monkeypatch.setattr("trainer.preference._logps_with", logps_with)
    long, short = "Town 1 is seven kilometres away by the coast road, a little more by the hills.", "2 mi."
    asked = [PreferenceCase.of(e) for e in (_rated(1, 1.0, long), _rated(2, -1.0, short))]
    gate = Gate(model, tokenizer, device, load_embedder(), [], GateConfig.from_settings(rated_gain_per_token=True))
    registry = AdapterRegistry(tmp_path / "registry")
    recorded = {"per-token": {"r": 4, "preference_kto_token_beta": 5.0}, "summed": {"r": 4, "preference_kto_token_beta": 0.0}}
    recorded |= {"older": {"r": 4}, "unrecorded": {}}
    passed = {}
    for name, hyperparameters in recorded.items():
        adapter = random_adapter(model, tmp_path / name, seed=1)
        fields = {"request_id": name, "held_out_preferences": asked, "hyperparameters": hyperparameters}
        info = registry.register("rae", adapter, manifest(**fields))
        report = validate_adapter(
            gate=gate, registry=registry, store=None, tests_dir="t", user_id="rae", adapter=info.path, baseline=None
        )
        passed[name] = report.suites["preference"].passed
    assert passed == {"per-token": True, "summed": False, "older": False, "unrecorded": True}, "unrecorded: the gate's own"

    # What a job records (its TrainConfig, trainer/job.py) says how it learned: per token by default.
    for beta, per_token in ((5.0, True), (0.0, False)):
        trained = asdict(TrainConfig.from_settings(preference_kto_token_beta=beta))
        assert manifest(hyperparameters=trained).hyperparameters.rated_gain_per_token() is per_token


@pytest.mark.parametrize("kto_token_beta", [0.0, 5.0], ids=["summed", "per-token"])
def test_a_ratings_only_run_learns_to_prefer_the_liked_answers_and_the_gate_judges_it(tiny, tmp_path, kto_token_beta):
    model, tokenizer, device = tiny
    train, test = split_holdout(_short_and_long(), seed=0)
    cfg = TrainConfig.from_settings(epochs=6, batch_size=4, learning_rate=5e-3, r=8, alpha=16, dropout=0.0, preference_beta=0.5)
    cfg = replace(cfg, preference_kto_token_beta=kto_token_beta)
    result = train_adapter(model, tokenizer, device, train, cfg, tmp_path / "adapter")
    assert result.steps == 6 * math.ceil(len(train) / 4) and all(u is None for u in result.loss_curves["user"]), (
        "preference steps only: no answer is a supervised target"
    )
    assert result.loss_curve[-1] < result.loss_curve[0]
    per_token = kto_token_beta > 0  # the gate compares rated answers as the run learned them
    accuracy, pairs = preference_accuracy(model, tokenizer, device, result.adapter_dir, None, train, per_token)
    assert pairs == 64 and accuracy >= 0.9, "on what it was trained on, the liked answers gained"
    gate = Gate(model, tokenizer, device, load_embedder(), [], GateConfig.from_settings(rated_gain_per_token=per_token))
    report = gate.evaluate(result.adapter_dir, [], preferences=test)
    assert report.passed and report.suites["preference"].score >= 0.6, report.reasons

    # Taught the opposite (every rating flipped), a candidate prefers the disliked answers: rejected.
    flipped = [e.model_copy(update={"rating": -(e.rating or 0)}) for e in train]
    contrary = train_adapter(model, tokenizer, device, flipped, cfg, tmp_path / "contrary")
    rejected = gate.evaluate(contrary.adapter_dir, [], preferences=test)
    assert not rejected.passed and rejected.suites["preference"].score < 0.6
    assert any("held-out rated pairs" in r for r in rejected.reasons), rejected.reasons

    # Validated again later (a validate command), each version is judged on the pairs its manifest says were asked.
    registry = AdapterRegistry(tmp_path / "registry")
    asked = [PreferenceCase.of(e) for e in test]
    for name, adapter in (("liked", result.adapter_dir), ("contrary", contrary.adapter_dir)):
        info = registry.register("rae", adapter, manifest(request_id=name, held_out_preferences=asked))
        again = validate_adapter(
            gate=gate, registry=registry, store=None, tests_dir="t", user_id="rae", adapter=info.path, baseline=None
        )
        assert again.passed == (name == "liked") and "preference" in again.suites, again.reasons
