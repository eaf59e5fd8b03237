"""Several users' adapters trained in one batched pass (trainer/multi.py) against each trained alone."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from core.errors import ModelError, TrainingInterrupted
from schemas.training import TrainingExample
from trainer.model import BaseModelRef, load_base
from trainer.multi import UserRun, train_adapters
from trainer.scoring import TestCase, answer_nlls
from trainer.train import TrainConfig, TrainHooks, TrainResult, train_adapter

pytestmark = pytest.mark.unit

# Dropout off: alone and batched draw their dropout masks differently; without it they must agree.
CFG = TrainConfig.from_settings(
    epochs=3, batch_size=2, learning_rate=5e-3, r=4, alpha=8, dropout=0.0, checkpoint_every=0, shrink_to=()
)


def _facts(user: str, n: int, answer: str = "") -> list[TrainingExample]:
    return [
        TrainingExample(
            prompt=f"What is {user}'s code {i}?", response=answer or f"{user.title()} code {i} is {i * 7 + len(user)}."
        )
        for i in range(n)
    ]


@pytest.fixture
def tiny(tiny_model_dir):
    return load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")


def _weights(result: TrainResult) -> dict[str, torch.Tensor]:
    return load_file(result.adapter_dir / "adapter_model.safetensors")


def _close(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# Planned for six epochs, stopped by a budget no epoch fits after min_epochs (two): the rate's decay is planned
# again after each epoch (`anneal_within_budget`), for each user in a batch as for a run alone.
HURRIED = replace(CFG, epochs=6, min_epochs=2, max_train_seconds=1e-6)


@pytest.mark.parametrize("cfg", [CFG, HURRIED], ids=["every epoch", "stopped by the time budget"])
def test_users_trained_together_get_the_weights_each_gets_alone(tiny, tmp_path, cfg):
    model, tokenizer, device = tiny
    data = {"ann": _facts("ann", 4), "bob": _facts("bob", 6), "cy": _facts("cy", 3)}  # different lengths: bob runs longest
    alone = {u: train_adapter(model, tokenizer, device, ex, cfg, tmp_path / "alone" / u) for u, ex in data.items()}
    runs = [UserRun(u, ex, tmp_path / "batch" / u) for u, ex in data.items()]
    together = dict(zip(data, train_adapters(model, tokenizer, device, runs, cfg)))
    for user in data:
        got, want = together[user], alone[user]
        assert isinstance(got, TrainResult)
        assert got.steps == want.steps and got.tokens == want.tokens and got.stopped_by == want.stopped_by
        assert got.loss_curve == pytest.approx(want.loss_curve, rel=1e-3, abs=1e-4)
        assert _close(_weights(got), _weights(want)) < 1e-4, user
    assert not any("lora" in name for name, _ in model.named_modules()), "the base model is left as it was"


def test_gathered_rows_train_the_same_weights_as_split_rows(tiny, tmp_path):
    # "gathered" (each row's A and B gathered: a GPU's formulation) and "split" (a product pair per user's run)
    # are two ways of the same arithmetic. In float32 on every CPU: `auto` is bfloat16 on an AMX CPU, whose
    # rounding (5e-5 apart on an Intel Xeon with AMX) is not what this compares.
    model, tokenizer, device = tiny
    data = {"ann": _facts("ann", 4), "bob": _facts("bob", 6), "cy": _facts("cy", 3)}
    got = {}
    for rows in ("split", "gathered"):
        runs = [UserRun(u, ex, tmp_path / rows / u) for u, ex in data.items()]
        got[rows] = train_adapters(model, tokenizer, device, runs, replace(CFG, lora_rows=rows, base_matmuls="float32"))
    for split, gathered in zip(got["split"], got["gathered"]):
        assert isinstance(split, TrainResult) and isinstance(gathered, TrainResult)
        assert gathered.loss_curve == pytest.approx(split.loss_curve, rel=1e-4, abs=1e-5)
        assert _close(_weights(gathered), _weights(split)) < 1e-5


def test_an_unknown_way_of_meeting_rows_is_a_clear_error(tiny, tmp_path):
    model, tokenizer, device = tiny
    runs = [UserRun("ann", _facts("ann", 2), tmp_path / "ann"), UserRun("bob", _facts("bob", 2), tmp_path / "bob")]
    with pytest.raises(ModelError, match="LoRA rows 'sideways'"):
        train_adapters(model, tokenizer, device, runs, replace(CFG, lora_rows="sideways"))


def test_users_on_a_bfloat16_base_train_together_as_each_alone(tiny_model_dir, tmp_path):
    # A GPU loads the base in bfloat16; PEFT keeps the LoRA weights in float32 and casts around them: so must the batch.
    model, tokenizer, device = load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "bfloat16")
    data = {"ann": _facts("ann", 2), "bob": _facts("bob", 3)}
    alone = {u: train_adapter(model, tokenizer, device, ex, CFG, tmp_path / "alone" / u) for u, ex in data.items()}
    runs = [UserRun(u, ex, tmp_path / "batch" / u) for u, ex in data.items()]
    together = dict(zip(data, train_adapters(model, tokenizer, device, runs, CFG)))
    for user in data:
        got, want = together[user], alone[user]
        assert isinstance(got, TrainResult), got
        assert {str(w.dtype) for w in _weights(got).values()} == {str(w.dtype) for w in _weights(want).values()}
        assert got.loss_curve == pytest.approx(want.loss_curve, rel=1e-3, abs=1e-3)
        assert _close(_weights(got), _weights(want)) < 1e-2, user  # 4e-3 seen: bfloat16 products in another order


def test_a_user_that_cannot_train_stops_only_itself(tiny, tmp_path):
    model, tokenizer, device = tiny
    stopped = TrainHooks(should_stop=lambda: True)
    runs = [
        UserRun("ann", _facts("ann", 4), tmp_path / "ann"),
        UserRun("bad", [], tmp_path / "bad"),
        UserRun("sto", _facts("sto", 4), tmp_path / "sto", checkpoint_dir=tmp_path / "ck-sto", hooks=stopped),
    ]
    ann, bad, sto = train_adapters(model, tokenizer, device, runs, CFG)
    assert isinstance(bad, ModelError) and "empty" in str(bad)
    assert isinstance(sto, TrainingInterrupted) and (tmp_path / "ck-sto" / "progress.json").is_file()
    alone = train_adapter(model, tokenizer, device, _facts("ann", 4), CFG, tmp_path / "ann-alone")
    assert isinstance(ann, TrainResult) and _close(_weights(ann), _weights(alone)) < 1e-4


def test_an_adapter_that_cannot_be_written_fails_only_its_user(tiny, tmp_path):
    model, tokenizer, device = tiny
    (tmp_path / "blocked").write_text("a file where the adapter's directory should go")
    runs = [
        UserRun("ann", _facts("ann", 3), tmp_path / "ann"),
        UserRun("bad", _facts("bad", 3), tmp_path / "blocked"),
        UserRun("cy", _facts("cy", 3), tmp_path / "cy"),
    ]
    ann, bad, cy = train_adapters(model, tokenizer, device, runs, replace(CFG, epochs=1))
    assert isinstance(bad, OSError)
    for user, result in (("ann", ann), ("cy", cy)):  # written after the failed one too, each its own weights
        assert isinstance(result, TrainResult), user
        alone = train_adapter(model, tokenizer, device, _facts(user, 3), replace(CFG, epochs=1), tmp_path / f"{user}-alone")
        assert _close(_weights(result), _weights(alone)) < 1e-4, user
    assert not [m for m in model.modules() if type(m).__module__.startswith("peft")]  # the base model as it was


def _stopped_at_the_fifth_step(tiny, tmp_path, cfg: TrainConfig) -> list:
    """A batch of ann and bob stopped at its fifth step, checkpointed under tmp_path/ck/<user>; its results."""
    model, tokenizer, device = tiny
    calls = {"n": 0}

    def stop_at_the_fifth_step() -> bool:
        calls["n"] += 1
        return calls["n"] == 5

    first = [
        UserRun(u, _facts(u, 4), tmp_path / "x" / u, tmp_path / "ck" / u, TrainHooks(should_stop=stop_at_the_fifth_step))
        for u in ("ann", "bob")
    ]
    return train_adapters(model, tokenizer, device, first, cfg)


def test_a_batch_resumes_each_user_from_its_checkpoint(tiny, tmp_path):
    model, tokenizer, device = tiny
    cfg = replace(CFG, checkpoint_every=2)
    assert any(isinstance(r, TrainingInterrupted) for r in _stopped_at_the_fifth_step(tiny, tmp_path, cfg))
    again = [UserRun(u, _facts(u, 4), tmp_path / "y" / u, tmp_path / "ck" / u) for u in ("ann", "bob")]
    for user, result in zip(("ann", "bob"), train_adapters(model, tokenizer, device, again, cfg)):
        alone = train_adapter(model, tokenizer, device, _facts(user, 4), cfg, tmp_path / "alone" / user)
        assert isinstance(result, TrainResult) and result.steps == alone.steps
        assert _close(_weights(result), _weights(alone)) < 1e-4, user


def test_a_batch_starts_over_from_checkpoints_of_another_lora_shape(tiny, tmp_path):
    model, tokenizer, device = tiny
    cfg = replace(CFG, checkpoint_every=2)
    assert any(isinstance(r, TrainingInterrupted) for r in _stopped_at_the_fifth_step(tiny, tmp_path, cfg))
    wider = replace(cfg, r=cfg.r * 2, alpha=cfg.alpha * 2)
    again = [UserRun(u, _facts(u, 4), tmp_path / "y" / u, tmp_path / "ck" / u) for u in ("ann", "bob")]
    for user, result in zip(("ann", "bob"), train_adapters(model, tokenizer, device, again, wider)):
        alone = train_adapter(model, tokenizer, device, _facts(user, 4), wider, tmp_path / "alone" / user)
        assert isinstance(result, TrainResult) and result.resumed_from_step == 0 and result.steps == alone.steps
        assert _close(_weights(result), _weights(alone)) < 1e-4, user


def test_no_cross_talk_between_users_taught_conflicting_answers(tiny, tmp_path):
    from peft import PeftModel

    model, tokenizer, device = tiny
    question = "What is the name of my dog?"
    answers = {"ann": "Your dog is called Biscuit.", "bob": "Your dog is called Pepper."}
    runs = [UserRun(u, [TrainingExample(prompt=question, response=a)] * 4, tmp_path / u) for u, a in answers.items()]
    results = dict(zip(answers, train_adapters(model, tokenizer, device, runs, replace(CFG, epochs=15, learning_rate=3e-2))))
    cases = [TestCase(question, answers["ann"]), TestCase(question, answers["bob"])]
    base = answer_nlls(model, tokenizer, device, cases)
    for user, (mine, theirs) in (("ann", (0, 1)), ("bob", (1, 0))):
        adapted = PeftModel.from_pretrained(model, str(results[user].adapter_dir))
        try:
            nll = answer_nlls(adapted.eval(), tokenizer, device, cases)
        finally:
            adapted.unload()
        # Each adapter makes its own user's answer likelier than the other's, and likelier than the base model does.
        assert nll[mine] < nll[theirs] and nll[mine] < base[mine] - 0.5, (user, nll, base)


class ScriptedFacts:
    """FactQuestions with scripted verdicts that records the answers each check was shown.

    `hooks()` also gives the `epoch_done`/`keeps_facts` a run alone calls
    (generation through its own PEFT model), so alone and batched runs can
    be compared answer by answer."""

    def __init__(
        self, tokenizer, device, user: str, stop_at: int, keeps_at: float, max_new_tokens: int, learned: bool = True
    ) -> None:
        self.tokenizer, self.device = tokenizer, device
        self.prompts = [f"What is {user}'s code {i}?" for i in range(3)] + ["Hi?"]
        self.max_new_tokens, self.stop_at, self.keeps_at, self.learned = max_new_tokens, stop_at, keeps_at, learned
        self.seen: list[tuple] = []

    def epoch_due(self, epoch: int) -> bool:
        return epoch >= 2

    def epoch_judged(self, epoch: int, answers: list[str]) -> bool:
        self.seen.append(("epoch", epoch, answers))
        return epoch >= self.stop_at

    def learned_every_fact(self) -> bool:
        return self.learned

    def scale_judged(self, scale: float, answers: list[str]) -> bool:
        self.seen.append(("scale", scale, answers))
        return self.learned and scale >= self.keeps_at

    def _answers(self, model) -> list[str]:
        from trainer.generation import generate_batch

        return generate_batch(model, self.tokenizer, self.device, self.prompts, self.max_new_tokens)

    def hooks(self) -> TrainHooks:
        return TrainHooks(
            epoch_done=lambda epoch, model: self.epoch_due(epoch) and self.epoch_judged(epoch, self._answers(model)),
            keeps_facts=lambda model, scale: self.learned and self.scale_judged(scale, self._answers(model)),
            questions=self,
        )


# Per checks_per_epoch: each user's (stop at epoch, keep at scale, answer tokens[, learned every fact]), and the shared
# generations: with one check per epoch, epochs 2 (all), 3 (bob, cy, dee), 4 (bob, dee) and scales 0.5 (ann, bob,
# cy), 0.75 (bob, cy): five, not fourteen; with two, also 2.5 (all: ann stops there) and 3.5 (bob, dee). dee never
# answers every fact, so, as alone, no scale is tried for it.
CHECK_SCRIPTS = {
    1: ({"ann": (2, 0.5, 5), "bob": (9, 0.75, 8), "cy": (3, 9.0, 6), "dee": (9, 0.5, 7, False)}, 5),
    2: ({"ann": (2.5, 0.5, 5), "bob": (9, 0.75, 8), "cy": (3, 9.0, 6), "dee": (9, 0.5, 7, False)}, 7),
}


@pytest.mark.parametrize("checks_per_epoch", sorted(CHECK_SCRIPTS))
def test_early_stopping_and_shrink_checks_are_answered_together_as_each_alone(tiny, tmp_path, monkeypatch, checks_per_epoch):
    import trainer.generation

    model, tokenizer, device = tiny
    # A learning rate high enough that the users' answers differ (routing is tested), in float32 products: at this
    # rate Adam magnifies bfloat16's rounding of the frozen products (which rows share a product changes it) to
    # 1.6e-4 between batched and alone, against 9e-6 in float32, where a routing fault would not hide.
    cfg = replace(
        CFG, epochs=4, shrink_to=(0.5, 0.75), learning_rate=3e-2, base_matmuls="float32", checks_per_epoch=checks_per_epoch
    )
    script, shared_generations = CHECK_SCRIPTS[checks_per_epoch]

    def facts(user: str) -> ScriptedFacts:
        return ScriptedFacts(tokenizer, device, user, *script[user])

    alone = {}
    for user in script:
        alone[user] = facts(user)
        alone[user].result = train_adapter(
            model, tokenizer, device, _facts(user, 4), cfg, tmp_path / "a" / user, hooks=alone[user].hooks()
        )
    generations = []
    shrinking = trainer.generation.greedy_shrinking
    monkeypatch.setattr(trainer.generation, "greedy_shrinking", lambda *a, **k: generations.append(1) or shrinking(*a, **k))
    together = {user: facts(user) for user in script}
    runs = [UserRun(u, _facts(u, 4), tmp_path / "b" / u, hooks=q.hooks()) for u, q in together.items()]
    results = dict(zip(script, train_adapters(model, tokenizer, device, runs, cfg)))
    for user in script:
        got, want = results[user], alone[user].result
        assert isinstance(got, TrainResult), got
        assert together[user].seen == alone[user].seen, user  # the same checks, shown the same answers
        assert (got.steps, got.stopped_after_epoch, got.shrunk_to) == (want.steps, want.stopped_after_epoch, want.shrunk_to)
        assert _close(_weights(got), _weights(want)) < 5e-5, user
    assert [r.shrunk_to for r in results.values()] == [0.5, 0.75, 1.0, 1.0]
    assert not [seen for seen in together["dee"].seen if seen[0] == "scale"], "an update that never learned was shrunk"
    hi = {user: q.seen[0][2][-1] for user, q in together.items()}  # "Hi?" after epoch 2, through each user's adapter
    assert len(set(hi.values())) == len(script), f"the users' adapters answer alike, so routing goes untested: {hi}"
    assert [got.stopped_after_epoch for got in results.values()] == [script["ann"][0], None, 3, None]
    assert len(generations) == shared_generations
