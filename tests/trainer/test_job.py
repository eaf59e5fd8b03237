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


def test_a_candidate_is_judged_as_its_runner_learned_rated_answers(tmp_path):
    """Per token or summed as the runner's own training config says, whatever the gate's settings (a runner built
    with training overrides)."""
    from types import SimpleNamespace

    from trainer.job import JobRunner
    from trainer.train import TrainConfig, TrainResult

    job = SimpleNamespace(held_out=[], explicit_cases=[])
    plan = SimpleNamespace(job=job, reference=None, facts=SimpleNamespace(previous=[]), examples=[], preferences=[])
    result = TrainResult(tmp_path, steps=1, tokens=1, seconds=1.0)
    for beta, per_token in ((0.0, False), (5.0, True)):
        runner = JobRunner(None, None, None, None, "cpu", TrainConfig.from_settings(preference_kto_token_beta=beta), None)
        assert runner._candidate(plan, result).rated_per_token is per_token


def _trained_adapter(adapter):
    """An adapter directory whose LoRA A is all 1.0 and B all 2.0 (the update as trained): its weights file."""
    import torch
    from safetensors.torch import save_file

    from schemas.manifest import ADAPTER_WEIGHTS

    adapter.mkdir(parents=True)
    weights = adapter / ADAPTER_WEIGHTS
    lora = {"m.q_proj.lora_A.weight": torch.ones(2, 4), "m.q_proj.lora_B.weight": torch.full((4, 2), 2.0)}
    save_file(lora, str(weights), metadata={"format": "pt"})
    return weights


def _b_of(weights) -> float:
    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    assert (tensors["m.q_proj.lora_A.weight"] == 1.0).all(), "A is never scaled"
    return float(tensors["m.q_proj.lora_B.weight"][0, 0])


def _scale_judging_gate(seen: list[float], passes_at: float, scales, facts_down_to: float = 0.0):
    """A gate that passes an adapter of `_trained_adapter` when its update is at most `passes_at` of the trained
    one, else rejects it for drift alone, and answers both held-out facts down to `facts_down_to` of it (one below);
    every B it judged is appended to `seen`."""
    from trainer.gate import GateConfig, GateReport, SuiteReport
    from trainer.scoring import CaseScore

    def facts(b: float) -> dict:
        matches = [1.0, 1.0 if b >= 2.0 * facts_down_to else 0.0]
        cases = [CaseScore(f"q{n}", "a", "a", 1.0, m, 1.0, 0.1, 0.9) for n, m in enumerate(matches)]
        return {"user": SuiteReport("user", 0.9, True, 0.5, None, cases)}

    class Gate:
        cfg = GateConfig.from_settings(drift_retry_scales=tuple(scales))

        def evaluate(self, candidate_dir, **_):
            from schemas.manifest import ADAPTER_WEIGHTS

            seen.append(_b_of(candidate_dir / ADAPTER_WEIGHTS))
            passed = seen[-1] <= 2.0 * passes_at
            return GateReport(passed, [] if passed else ["core suite regressed"], facts(seen[-1]), drifted=True)

        def evaluate_batch(self, candidates):
            return [self.evaluate(**candidate.arguments()) for candidate in candidates]

    return Gate()


def _runner_judged_by(gate, monkeypatch):
    """A JobRunner with `gate` whose candidates are their trained results' adapter directories."""
    from types import SimpleNamespace

    from trainer.job import JobRunner
    from trainer.train import TrainConfig

    runner = JobRunner(None, None, None, None, "cpu", TrainConfig.from_settings(), gate)
    candidate = lambda plan, result: SimpleNamespace(arguments=lambda: {"candidate_dir": result.adapter_dir})  # noqa: E731
    monkeypatch.setattr(runner, "_candidate", candidate)
    return runner


def _drift_retry(tmp_path, monkeypatch, passes_at: float, scales=(0.75, 0.5), facts_down_to: float = 0.0):
    """`JobRunner._smaller_if_drifted` on an adapter of `_trained_adapter` judged by `_scale_judging_gate`:
    (verdict, result, the B values the gate saw, the B left in the file)."""
    from types import SimpleNamespace

    from trainer.train import TrainResult

    weights = _trained_adapter(tmp_path / "adapter")
    seen: list[float] = []
    gate = _scale_judging_gate(seen, passes_at, scales, facts_down_to)
    runner = _runner_judged_by(gate, monkeypatch)
    first = gate.evaluate(weights.parent)
    seen.clear()
    result = TrainResult(weights.parent, steps=10, tokens=100, seconds=1.0, shrunk_to=0.8)
    report, result = runner._smaller_if_drifted(SimpleNamespace(job=SimpleNamespace(user_id="ann")), result, first)
    return report, result, seen, _b_of(weights)


def test_a_batch_gate_retries_its_drifted_candidates_alone_at_smaller_updates(tmp_path, monkeypatch):
    """The batch path (`_gate_together`): every candidate gated at once, then a drifted one alone."""
    from types import SimpleNamespace

    from trainer.lora import write_scaled_update
    from trainer.train import TrainResult

    seen: list[float] = []
    runner = _runner_judged_by(_scale_judging_gate(seen, passes_at=0.75, scales=(0.75, 0.5)), monkeypatch)
    files, done = {}, []
    for user in ("ann", "bob"):
        files[user] = _trained_adapter(tmp_path / user)
        plan = SimpleNamespace(job=SimpleNamespace(user_id=user), hooks=SimpleNamespace(gating=None))
        done.append((plan, TrainResult(files[user].parent, steps=10, tokens=100, seconds=1.0, shrunk_to=1.0)))
    write_scaled_update(files["bob"], files["bob"].read_bytes(), 0.5)  # bob's update as trained passes
    gated = runner._gate_together(done)
    (ann, _, ann_result), (bob, _, bob_result) = (gated[id(plan)] for plan, _ in done)
    assert seen == [2.0, 1.0, 1.5], "both at once (ann drifted, bob passed), then ann alone at 0.75"
    assert ann.passed and ann_result.shrunk_to == 0.75 and _b_of(files["ann"]) == 1.5
    assert bob.passed and bob_result.shrunk_to == 1.0 and _b_of(files["bob"]) == 1.0, "a passing candidate untouched"


def test_a_candidate_rejected_only_for_drift_is_kept_at_the_first_smaller_update_that_passes(tmp_path, monkeypatch):
    report, result, seen, left = _drift_retry(tmp_path, monkeypatch, passes_at=0.5)
    assert seen == [1.5, 1.0], "0.75 of the update, then 0.5"
    assert report.passed and left == 1.0, "the passing scale stays in the candidate's files"
    assert result.shrunk_to == pytest.approx(0.4), "the manifest's update_scaled: the shrink step's 0.8 times 0.5"


def test_when_no_smaller_update_passes_the_trained_one_and_the_first_verdict_stand(tmp_path, monkeypatch):
    report, result, seen, left = _drift_retry(tmp_path, monkeypatch, passes_at=0.1)
    assert seen == [1.5, 1.0] and not report.passed and report.reasons == ["core suite regressed"]
    assert left == 2.0 and result.shrunk_to == 0.8, "the update as trained is put back"


def test_without_retry_scales_a_drifted_candidate_is_gated_once(tmp_path, monkeypatch):
    report, result, seen, left = _drift_retry(tmp_path, monkeypatch, passes_at=0.5, scales=())
    assert seen == [] and not report.passed and left == 2.0


def test_a_smaller_update_that_answers_fewer_held_out_facts_is_not_kept(tmp_path, monkeypatch):
    """As the shrink step asks: a scale may give back general answers, never a fact the trained update answered."""
    report, result, seen, left = _drift_retry(tmp_path, monkeypatch, passes_at=0.75, facts_down_to=0.9)
    assert seen == [1.5, 1.0], "0.75 passed the gate but lost a fact; 0.5 failed"
    assert not report.passed and left == 2.0 and result.shrunk_to == 0.8
    report, result, seen, left = _drift_retry(tmp_path / "kept", monkeypatch, passes_at=0.75, facts_down_to=0.7)
    assert report.passed and seen == [1.5] and left == 1.5 and result.shrunk_to == pytest.approx(0.6)
