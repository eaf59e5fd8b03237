"""The training loop on a tiny model: PEFT output, answer-only loss, weights, resume."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from core.errors import TrainingInterrupted
from schemas.training import TrainingExample
from trainer.data import IGNORE, bucketed_batches, tokenize
from trainer.loss import answer_losses, answer_only_loss, base_answer_states, shared_prefix_len, weighted_loss
from trainer.model import BaseModelRef, load_base
from trainer.train import (
    TimeBudget,
    TrainConfig,
    TrainHooks,
    check_points,
    optimizer_and_schedule,
    remove_checkpoint,
    train_adapter,
)

pytestmark = pytest.mark.unit

EXAMPLES = [TrainingExample(prompt=f"What is code {n}?", response=f"Code {n} is {n * 7}.", weight=1.0) for n in range(6)]
CFG = TrainConfig.from_settings(epochs=3, batch_size=2, learning_rate=5e-3, r=4, alpha=8, checkpoint_every=2)


@pytest.fixture
def tiny(tiny_model_dir):
    return load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")


def test_loss_is_on_response_tokens_only(tiny):
    _model, tokenizer, _ = tiny
    (item,) = tokenize(tokenizer, [EXAMPLES[3]], max_len=256)
    trained = [t for t, lab in zip(item.input_ids, item.labels) if lab != IGNORE]
    assert "Code 3 is 21." in tokenizer.decode(trained)
    assert "What is code" not in tokenizer.decode(trained)
    assert item.labels[0] == IGNORE


def test_weighted_loss_weights_examples():
    logits = torch.zeros(2, 3, 5)
    logits[0, :, 1] = 5.0  # example 0 predicts token 1 well; example 1 predicts it badly
    labels = torch.tensor([[IGNORE, 1, 1], [IGNORE, 2, 2]])
    even = weighted_loss(logits, labels, torch.tensor([1.0, 1.0]))
    skewed = weighted_loss(logits, labels, torch.tensor([1.0, 3.0]))
    assert skewed > even


def test_length_bucketing_groups_similar_lengths(tiny):
    _model, tokenizer, _ = tiny
    examples = [TrainingExample(prompt="x " * (n % 9 + 1), response="y") for n in range(64)]
    batches = bucketed_batches(tokenize(tokenizer, examples, 256), batch_size=8, seed=0)
    spread = [max(len(t.input_ids) for t in b) - min(len(t.input_ids) for t in b) for b in batches]
    assert sum(spread) / len(spread) <= 2
    assert sorted(len(b) for b in batches) == [8] * 8


def test_train_writes_a_peft_adapter_that_changes_answers(tiny, tmp_path):
    from peft import PeftModel

    model, tokenizer, device = tiny
    base_params = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_adapter(model, tokenizer, device, EXAMPLES, CFG, tmp_path / "adapter")
    files = sorted(p.name for p in result.adapter_dir.iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))], "never pickle"
    assert result.steps == 9 and len(result.loss_curve) == 9 and result.loss_curve[-1] < result.loss_curve[0]
    # The kept base model is untouched after training.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base_params.items())
    ids = torch.tensor([tokenize(tokenizer, [EXAMPLES[0]], 256)[0].input_ids])
    with torch.no_grad():
        before = model(ids).logits
        adapted = PeftModel.from_pretrained(model, str(result.adapter_dir))
        after = adapted(ids).logits
    assert not torch.allclose(before, after)
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"


def _stopping_at_step(step: int) -> TrainHooks:
    """Hooks that ask the run to stop when it asks for the `step`-th time (at that step)."""
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] == step

    return TrainHooks(should_stop=should_stop)


def test_a_stopped_run_resumes_from_its_checkpoint(tiny, tmp_path):
    model, tokenizer, device = tiny
    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingInterrupted, match="stopped at step 5/9; checkpoint saved"):
        train_adapter(model, tokenizer, device, EXAMPLES, CFG, tmp_path / "a1", ckpt, _stopping_at_step(5))
    assert json.loads((ckpt / "progress.json").read_text())["step"] == 5
    assert (ckpt / "optimizer.safetensors").is_file()
    # A kill inside the checkpoint swap leaves the last complete checkpoint under its ".old" name.
    os.replace(ckpt, tmp_path / "ckpt.old")
    resumed = train_adapter(model, tokenizer, device, EXAMPLES, CFG, tmp_path / "a2", ckpt)
    assert resumed.resumed_from_step == 5 and resumed.steps == 9 and len(resumed.loss_curve) == 9
    straight = train_adapter(model, tokenizer, device, EXAMPLES, CFG, tmp_path / "a3")
    assert resumed.loss_curve[:5] == straight.loss_curve[:5]

    # The finished adapter stays as the checkpoint until the caller has registered it: a kill
    # in between (during the gate) resumes to the same adapter without training again.
    assert json.loads((ckpt / "progress.json").read_text())["finished"] is True
    again = train_adapter(model, tokenizer, device, EXAMPLES, CFG, tmp_path / "a4", ckpt)
    assert again.resumed_from_step == 9 and again.loss_curve == resumed.loss_curve
    saved = [load_file(d / "adapter_model.safetensors") for d in (tmp_path / "a2", tmp_path / "a4")]
    assert saved[0].keys() == saved[1].keys() and all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    remove_checkpoint(ckpt)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt")]


def test_a_checkpoint_of_another_lora_shape_is_dropped_and_the_run_starts_over(tiny, tmp_path, caplog):
    """Settings changed between a kill and the restart (another rank): the checkpoint cannot continue this run, so
    the run starts from the beginning and says why, instead of failing on every restart."""
    model, tokenizer, device = tiny
    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingInterrupted):
        train_adapter(model, tokenizer, device, EXAMPLES, CFG, tmp_path / "a1", ckpt, _stopping_at_step(5))
    wider = replace(CFG, r=8, alpha=16)
    with caplog.at_level("WARNING", logger="adaptloop.trainer"):
        resumed = train_adapter(model, tokenizer, device, EXAMPLES, wider, tmp_path / "a2", ckpt)
    straight = train_adapter(model, tokenizer, device, EXAMPLES, wider, tmp_path / "a3")
    assert resumed.resumed_from_step == 0 and resumed.loss_curve == straight.loss_curve
    assert "another LoRA shape" in caplog.text and "starting over" in caplog.text
    assert json.loads((ckpt / "progress.json").read_text())["step"] == resumed.steps  # the new run's own


def test_empty_dataset_is_a_clear_error(tiny, tmp_path):
    from core.errors import ModelError

    model, tokenizer, device = tiny
    with pytest.raises(ModelError, match="empty"):
        train_adapter(model, tokenizer, device, [], CFG, tmp_path / "x")


def test_no_pickle_anywhere_in_the_package():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[2]
    offenders = []
    for path in [
        *root.glob("trainer/**/*.py"),
        *root.glob("streams/**/*.py"),
        *root.glob("adaptloop/**/*.py"),
        *root.glob("api/**/*.py"),
    ]:
        text = path.read_text()
        if re.search(r"^\s*import pickle|pickle\.load|torch\.load\((?![^)]*weights_only=True)", text, re.M):
            offenders.append(str(path))
    assert offenders == []


def test_answer_only_loss_equals_the_full_loss(tiny):
    from peft import LoraConfig, get_peft_model

    from trainer.data import collate

    model, tokenizer, device = tiny
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    try:
        batch = tokenize(
            tokenizer, [EXAMPLES[0], TrainingExample(prompt="A much longer question " * 5, response="Yes."), EXAMPLES[2]], 256
        )
        ids, mask, labels, _ = collate(batch, tokenizer.pad_token_id, device)
        weights = torch.tensor([1.0, 2.0, 0.5])
        full = weighted_loss(peft_model(input_ids=ids, attention_mask=mask).logits, labels, weights)
        fast = answer_only_loss(peft_model, ids, mask, labels, weights)
        assert torch.allclose(full, fast, atol=1e-5)
    finally:
        peft_model.unload()


def test_anchor_rows_are_held_to_the_base_distribution_by_kl(tiny, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from core.errors import ModelError
    from trainer.data import collate

    model, tokenizer, device = tiny
    anchor = TrainingExample(prompt="What is code 9?", response="Code 9 is 63.", source="anchor")
    items = tokenize(tokenizer, [EXAMPLES[0], anchor], 256)
    assert [t.anchor for t in items] == [False, True]
    ids, mask, labels, weights = collate(items, tokenizer.pad_token_id, device)
    rows = torch.tensor([t.anchor for t in items])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    try:
        # The base model's side, computed once before training, base frozen (here next to a longer row: padding).
        answers = base_answer_states(model, items[::-1] + [items[1]], tokenizer.pad_token_id, device)
        assert answers.logp  # the tiny model's vocabulary fits: its log-probabilities are kept
        base_logp = answers.per_item[id(items[1])]
        assert base_logp.shape == (sum(label != IGNORE for label in items[1].labels), model.config.vocab_size)
        assert torch.allclose(base_logp.exp().sum(dim=-1), torch.ones(len(base_logp)), atol=1e-5)
        monkeypatch.setattr("trainer.loss.KEPT_LOG_PROBS_BYTES", 0)  # too large to keep: the states, projected at every step
        states = base_answer_states(model, items[::-1] + [items[1]], tokenizer.pad_token_id, device)
        assert not states.logp
        base = states.per_item[id(items[1])]
        assert base.shape == (sum(label != IGNORE for label in items[1].labels), model.config.hidden_size)
        # A fresh adapter (B = 0) is the base model: the anchor row's KL is 0, the user row's loss is not.
        only_anchor = answer_only_loss(peft_model, ids[1:], mask[1:], labels[1:], weights[1:], rows[1:], base, kl_weight=1.0)
        assert abs(only_anchor.item()) < 1e-5
        kept = answer_losses(peft_model, ids[1:], mask[1:], labels[1:], weights[1:], rows[1:], kl_weight=1.0, base_logp=base_logp)
        assert abs(kept[0].item()) < 1e-5
        with pytest.raises(ModelError, match="base model's states"):
            answer_only_loss(peft_model, ids[1:], mask[1:], labels[1:], weights[1:], rows[1:], base[:-1], kl_weight=1.0)
        both = answer_only_loss(peft_model, ids, mask, labels, torch.tensor([1.0, 1.0]), rows, base, kl_weight=1.0)
        user_only = answer_only_loss(peft_model, ids[:1], mask[:1], labels[:1], weights[:1])
        assert torch.allclose(both, user_only / 2, atol=1e-5)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.fill_(0.05)  # now the adapter moves the distribution: the KL grows
        moved = answer_only_loss(peft_model, ids[1:], mask[1:], labels[1:], weights[1:], rows[1:], base, kl_weight=1.0)
        assert moved.item() > 1e-4
        kept = answer_losses(peft_model, ids[1:], mask[1:], labels[1:], weights[1:], rows[1:], kl_weight=1.0, base_logp=base_logp)
        assert torch.allclose(kept[0], moved, atol=1e-5)  # the kept log-probabilities give the same loss
    finally:
        peft_model.unload()


def test_a_shared_prefix_gives_the_full_batchs_loss_and_gradients(tiny):
    """The rows' common prefix runs once and is broadcast: same loss, same LoRA gradients as the plain batch."""
    from peft import LoraConfig, get_peft_model

    from trainer.data import collate

    model, tokenizer, device = tiny
    batch = tokenize(tokenizer, [EXAMPLES[0], TrainingExample(prompt="What is code 12345?", response="Yes."), EXAMPLES[2]], 256)
    ids, mask, labels, _ = collate(batch, tokenizer.pad_token_id, device)
    weights = torch.tensor([1.0, 2.0, 0.5])
    prefix = shared_prefix_len(ids, mask, labels)
    assert prefix >= 4  # the template's start and "What is code" are shared
    assert (labels[:, : prefix + 1] == IGNORE).all()  # no answer token inside the shared part
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"])
    )
    try:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)  # a trained adapter: the prefix's keys and values depend on it
        params = [p for p in peft_model.parameters() if p.requires_grad]
        full = weighted_loss(peft_model(input_ids=ids, attention_mask=mask).logits, labels, weights)
        full_grads = torch.autograd.grad(full, params)
        fast = answer_only_loss(peft_model, ids, mask, labels, weights)
        fast_grads = torch.autograd.grad(fast, params)
        assert torch.allclose(full, fast, atol=1e-5)
        for a, b in zip(full_grads, fast_grads):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
        assert any(g.abs().sum() > 0 for g in fast_grads)
    finally:
        peft_model.unload()


def test_a_run_can_start_from_an_earlier_adapter(tiny, tmp_path):
    from core.errors import ModelError

    model, tokenizer, device = tiny
    first = train_adapter(model, tokenizer, device, EXAMPLES, CFG, tmp_path / "v1")
    one_step = replace(CFG, epochs=1, batch_size=6, learning_rate=1e-9, warmup_steps=1)
    warm = train_adapter(model, tokenizer, device, EXAMPLES, one_step, tmp_path / "v2", init_adapter=first.adapter_dir)
    cold = train_adapter(model, tokenizer, device, EXAMPLES, one_step, tmp_path / "v2-cold")
    # One step at a negligible rate: the warm start's first loss is v1's trained loss, the cold one's the base model's.
    assert warm.loss_curve[0] < cold.loss_curve[0] - 0.1
    v1, v2 = (load_file(d / "adapter_model.safetensors") for d in (first.adapter_dir, warm.adapter_dir))
    assert all(torch.allclose(v1[k], v2[k], atol=1e-5) for k in v1)
    other_shape = replace(one_step, r=8)
    with pytest.raises(ModelError, match="LoRA shape"):
        train_adapter(model, tokenizer, device, EXAMPLES, other_shape, tmp_path / "v2-r8", init_adapter=first.adapter_dir)


def test_lora_can_be_limited_to_the_top_layers(tiny, tmp_path):
    model, tokenizer, device = tiny
    layers = model.config.num_hidden_layers
    top = replace(CFG, epochs=1, top_layer_share=1 / layers)
    result = train_adapter(model, tokenizer, device, EXAMPLES, top, tmp_path / "top")
    touched = {int(k.split(".layers.")[1].split(".")[0]) for k in load_file(result.adapter_dir / "adapter_model.safetensors")}
    assert layers > 1 and touched == {layers - 1}


def test_the_time_budget_stops_a_run_after_min_epochs(tiny, tmp_path):
    model, tokenizer, device = tiny
    five = replace(CFG, epochs=5, batch_size=6, min_epochs=2, checkpoint_every=0)
    # Any epoch overruns a budget of a microsecond: the run stops as soon as min_epochs allows.
    hurried = train_adapter(model, tokenizer, device, EXAMPLES, replace(five, max_train_seconds=1e-6), tmp_path / "a")
    assert (hurried.steps, hurried.stopped_after_epoch, hurried.stopped_by) == (2, 2, "time budget")
    stop_at_four = TrainHooks(epoch_done=lambda epoch, _model: epoch == 4)
    unbounded = train_adapter(
        model, tokenizer, device, EXAMPLES, replace(five, max_train_seconds=0), tmp_path / "b", hooks=stop_at_four
    )
    assert (unbounded.steps, unbounded.stopped_after_epoch, unbounded.stopped_by) == (4, 4, "early stopping")
    roomy = train_adapter(model, tokenizer, device, EXAMPLES, replace(five, max_train_seconds=3600), tmp_path / "c")
    assert (roomy.steps, roomy.stopped_after_epoch, roomy.stopped_by) == (5, None, None)
    # A slow first epoch (a 2 s check) sets the pace even after a quick second one: another epoch
    # could take 2 s again, and 2 s more do not fit a 3 s budget. (The sleep is the behaviour under
    # test, a slow check; the budget is 3 s of a run whose other epochs take milliseconds.)
    slow_check = TrainHooks(epoch_done=lambda epoch, _model: time.sleep(2.0 if epoch == 1 else 0))
    slow_start = train_adapter(
        model, tokenizer, device, EXAMPLES, replace(five, max_train_seconds=3.0), tmp_path / "d", hooks=slow_check
    )
    assert (slow_start.steps, slow_start.stopped_after_epoch, slow_start.stopped_by) == (2, 2, "time budget")


def test_check_points_are_evenly_spaced_and_end_at_the_epochs_end():
    assert check_points(6, 1) == {5: 1}
    assert check_points(6, 2) == {2: 0.5, 5: 1}
    assert check_points(5, 2) == {2: 0.5, 4: 1}
    assert check_points(8, 4) == {1: 0.25, 3: 0.5, 5: 0.75, 7: 1}
    assert check_points(1, 2) == {0: 1}  # one step an epoch: its end is the only point


def test_early_stopping_can_stop_halfway_through_an_epoch(tiny, tmp_path):
    model, tokenizer, device = tiny
    cfg = replace(CFG, epochs=4, batch_size=1, checkpoint_every=0, max_train_seconds=0, checks_per_epoch=2)
    per_epoch = train_adapter(model, tokenizer, device, EXAMPLES, replace(cfg, epochs=1), tmp_path / "one").steps
    asked: list[float] = []
    halfway = TrainHooks(epoch_done=lambda epoch, _model: asked.append(epoch) or epoch == 2.5)
    result = train_adapter(model, tokenizer, device, EXAMPLES, cfg, tmp_path / "half", hooks=halfway)
    assert per_epoch >= 2 and asked == [0.5, 1, 1.5, 2, 2.5]
    assert (result.stopped_after_epoch, result.stopped_by) == (2.5, "early stopping")
    assert result.steps == 2 * per_epoch + math.ceil(per_epoch / 2)


def test_the_update_is_shrunk_to_the_smallest_scale_that_keeps_the_facts(tiny, tmp_path):
    model, tokenizer, device = tiny
    cfg = replace(CFG, shrink_to=(0.75, 0.5))
    asked = []

    def keeps_facts(peft_model, scale):
        asked.append(scale)
        return scale >= 0.75  # 0.5 forgets something, 0.75 does not

    shrunk = train_adapter(
        model, tokenizer, device, EXAMPLES, cfg, tmp_path / "shrunk", hooks=TrainHooks(keeps_facts=keeps_facts)
    )
    as_trained = train_adapter(
        model,
        tokenizer,
        device,
        EXAMPLES,
        replace(CFG, shrink_to=()),
        tmp_path / "plain",
        hooks=TrainHooks(keeps_facts=keeps_facts),
    )
    assert (asked, shrunk.shrunk_to, as_trained.shrunk_to) == ([0.5, 0.75], 0.75, 1.0)
    small, full = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (shrunk, as_trained))
    for key in full:
        expected = full[key] * 0.75 if "lora_B" in key else full[key]  # the update B·A scales with B alone
        assert torch.allclose(small[key], expected, atol=1e-6), key
    kept_nothing = train_adapter(
        model, tokenizer, device, EXAMPLES, cfg, tmp_path / "none", hooks=TrainHooks(keeps_facts=lambda m, s: False)
    )
    untouched = load_file(kept_nothing.adapter_dir / "adapter_model.safetensors")
    assert kept_nothing.shrunk_to == 1.0 and all(torch.equal(untouched[k], full[k]) for k in full)


def test_user_loss_and_anchor_kl_are_recorded_apart(tiny, tmp_path):
    """The optimizer's loss mixes two things; the run records each step's user cross-entropy and anchor KL apart."""
    model, tokenizer, device = tiny
    anchors = [
        TrainingExample(prompt=f"General question {n}?", response=f"General answer {n}.", source="anchor") for n in range(6)
    ]
    reports = []
    result = train_adapter(
        model,
        tokenizer,
        device,
        EXAMPLES + anchors,
        replace(CFG, epochs=2, checkpoint_every=0),
        tmp_path / "a",
        hooks=TrainHooks(progress=reports.append),
    )
    user, kl = result.loss_curves["user"], result.loss_curves["anchor_kl"]
    assert len(user) == len(kl) == len(result.loss_curve) == result.steps == len(reports)
    assert all(u is not None or k is not None for u, k in zip(user, kl)), "every batch has a row of one kind or the other"
    assert all(k is None or k >= -1e-6 for k in kl) and any(k is not None for k in kl)
    assert [(r.step, r.user_loss, r.anchor_kl) for r in reports] == list(zip(range(1, result.steps + 1), user, kl))
    # Each step's total is the weighted mean of its rows: between its parts (KL counted with its weight).
    for total, u, k in zip(result.loss_curve, user, kl):
        parts = [v for v in (u, None if k is None else k * CFG.anchor_kl) if v is not None]
        assert min(parts) - 1e-3 <= total <= max(parts) + 1e-3
    plain = train_adapter(model, tokenizer, device, EXAMPLES, replace(CFG, epochs=1), tmp_path / "b")
    assert all(k is None for k in plain.loss_curves["anchor_kl"]) and plain.loss_curves["user"] == plain.loss_curve


def test_the_time_budget_plans_the_epochs_that_fit_and_stops_after_them():
    clock = [0.0]
    budget = TimeBudget(replace(CFG, epochs=8, min_epochs=2, max_train_seconds=100.0), 0.0, 0, clock=lambda: clock[0])
    assert budget.epochs_that_fit(0) == 8, "no pace yet: every epoch"
    planned, done = [], 0
    while True:  # epochs of 30 s against 100 s: three fit
        clock[0], done = clock[0] + 30.0, done + 1
        budget.note_epoch(30.0)
        planned.append(budget.epochs_that_fit(done))
        if budget.spent_after(done):
            break
    assert (planned, done) == ([3, 3, 3], 3)
    tight = TimeBudget(replace(CFG, epochs=8, min_epochs=2, max_train_seconds=10.0), 0.0, 0, clock=lambda: 30.0)
    tight.note_epoch(30.0)
    assert tight.epochs_that_fit(1) == 2, "never fewer than min_epochs"
    unbounded = TimeBudget(replace(CFG, epochs=8, max_train_seconds=0), 0.0, 0, clock=lambda: 30.0)
    unbounded.note_epoch(30.0)
    assert unbounded.epochs_that_fit(1) == 8


@pytest.mark.parametrize("anneal", [True, False])
def test_a_run_the_time_budget_stops_decays_its_rate_to_zero_where_it_ends(tiny, tmp_path, monkeypatch, anneal):
    """Planned for eight epochs and stopped after two, the rate was 87% of its peak at the last step; with
    `anneal_within_budget` the decay is planned again after the first epoch to end with the second."""
    import trainer.train as train

    rates: list[float] = []
    step = train._optimizer_step

    def recording(loss, optimizer, *rest):
        rates.append(optimizer.param_groups[0]["lr"])
        step(loss, optimizer, *rest)

    monkeypatch.setattr(train, "_optimizer_step", recording)
    model, tokenizer, device = tiny
    cfg = replace(CFG, epochs=8, batch_size=1, min_epochs=2, checkpoint_every=0, max_train_seconds=1e-6)
    result = train_adapter(model, tokenizer, device, EXAMPLES, replace(cfg, anneal_within_budget=anneal), tmp_path / "a")
    per_epoch = len(EXAMPLES)
    assert (result.steps, result.stopped_by) == (2 * per_epoch, "time budget")

    def rate(s: int, end: int) -> float:
        return cfg.learning_rate * min(1.0, (s + 1) / cfg.warmup_steps) * (1 - s / end) ** 0.5

    ends = [8 * per_epoch] * per_epoch + [2 * per_epoch if anneal else 8 * per_epoch] * per_epoch
    assert rates == pytest.approx([rate(s, end) for s, end in enumerate(ends)])


def test_a_new_plan_moves_the_next_steps_rate_at_once():
    import torch

    optimizer, schedule, plan = optimizer_and_schedule([torch.nn.Parameter(torch.ones(2))], CFG, 100)
    for _ in range(10):
        optimizer.step()
        schedule.step()
    plan.replan(20)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(CFG.learning_rate * (1 - 10 / 20) ** 0.5)
    assert schedule.get_last_lr() == [optimizer.param_groups[0]["lr"]]
    for _ in range(10):
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[0]["lr"] == 0
