"""The training recipe: LoRA on a kept base model, answers-only loss, anchors held by KL, checkpoints.

    result = train_adapter(model, tokenizer, device, examples, cfg, out_dir, checkpoint_dir, hooks)

Reads top to bottom, like a torchtune recipe:
  1. set up: seed, tokenize, the base model's anchor states (once), LoRA;
  2. resume from a checkpoint, or warm-start from an earlier adapter;
  3. train epoch by epoch: forward, loss on answer tokens, backward, clip,
     AdamW step, a checkpoint every `checkpoint_every` steps;
  4. after each epoch: early stopping (`hooks.epoch_done`) and the time budget;
  5. shrink the update to the smallest scale that keeps the facts;
  6. finish: the finished checkpoint, the adapter in PEFT format, LoRA removed
     (the base model is as it was).
A crashed run called again with the same checkpoint_dir resumes from its last
checkpoint. The last checkpoint is the finished adapter; the caller removes it
(`remove_checkpoint`) once the version is registered.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from core.encryption import UserSeal
from core.errors import ModelError, TrainingInterrupted
from core.settings import Settings, defaults
from schemas.training import TrainingExample
from trainer.checkpoint import Progress, load_checkpoint, remove_checkpoint, save_checkpoint, usable_checkpoint
from trainer.data import Tokenized, bucketed_batches, collate, tokenize
from trainer.frozen import FrozenBelow, first_adapted_layer, frozen_below
from trainer.generation import pad_id
from trainer.lora import add_lora, load_adapter_weights, lora_state, shrink_update
from trainer.loss import answer_losses, base_answer_states, loss_parts
from trainer.precision import FrozenMatmuls, effective, low_precision
from trainer.preference import (
    PreferenceItem,
    PreferenceLoss,
    preference_items,
    preference_loss,
    reference_logps,
    supervised,
    uses_preference,
)

__all__ = [
    "DecayPlan",
    "RunState",
    "StepReport",
    "TimeBudget",
    "TrainConfig",
    "TrainHooks",
    "TrainResult",
    "optimizer_and_schedule",
    "remove_checkpoint",
    "save_adapter",
    "train_adapter",
    "wind_forward",
]


@dataclass(frozen=True)
class TrainConfig:
    """`training.*` and `lora.*` of the settings (defaults and the meaning of each: core/settings.py)."""

    epochs: int
    learning_rate: float
    batch_size: int
    max_seq_len: int
    seed: int
    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]
    top_layer_share: float
    checkpoint_every: int
    anchor_divergence: str
    anchor_kl: float
    early_stopping: bool
    min_epochs: int
    max_train_seconds: float
    warm_start: bool
    shrink_to: tuple[float, ...]
    replay_per_fact: int
    answer_batch: int  # most prompts the batched early-stopping checks answer together: validation.batch_size
    objective: str  # sft | sft+preference | auto (trainer/preference.py)
    preference_beta: float
    preference_weight: float
    preference_undesirable_weight: float
    preference_kto_token_beta: float  # above 0: KTO per token with this beta (trainer/preference.py)
    base_matmuls: str  # auto | float32 | bfloat16 (trainer/precision.py)
    checks_per_epoch: int  # early-stopping checks per epoch once min_epochs are done (`check_points`)
    anneal_within_budget: bool  # the rate reaches zero where the time budget ends the run (`DecayPlan`)
    max_grad_norm: float = 1.0  # not settings: fixed parts of the recipe
    lora_rows: str = "auto"  # how a batch's users' rows meet their adapters (trainer/multi.py LORA_ROWS)
    warmup_steps: int = 2

    @property
    def preference_losses(self) -> PreferenceLoss:
        """How the preference steps weigh their losses (trainer/preference.py)."""
        return PreferenceLoss(self.preference_beta, self.preference_undesirable_weight, self.preference_kto_token_beta)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides) -> TrainConfig:
        s = settings or defaults()
        t, lora = s.training, s.lora
        config = cls(
            epochs=t.epochs,
            learning_rate=t.learning_rate,
            batch_size=t.batch_size,
            max_seq_len=t.max_seq_len,
            seed=t.seed,
            r=lora.r,
            alpha=lora.alpha,
            dropout=lora.dropout,
            target_modules=tuple(lora.target_modules),
            top_layer_share=lora.top_layer_share,
            checkpoint_every=t.checkpoint_every,
            anchor_divergence=t.anchor_divergence,
            anchor_kl=t.anchor_kl,
            early_stopping=t.early_stopping,
            min_epochs=t.min_epochs,
            max_train_seconds=t.max_train_seconds,
            warm_start=t.warm_start,
            shrink_to=tuple(t.shrink_to),
            replay_per_fact=t.replay_per_fact,
            objective=t.objective,
            preference_beta=t.preference_beta,
            preference_weight=t.preference_weight,
            preference_undesirable_weight=t.preference_undesirable_weight,
            preference_kto_token_beta=t.preference_kto_token_beta,
            base_matmuls=t.base_matmuls,
            checks_per_epoch=t.checks_per_epoch,
            anneal_within_budget=t.anneal_within_budget,
            answer_batch=s.validation.batch_size,
        )
        return replace(config, **overrides)


@dataclass(frozen=True)
class StepReport:
    """One optimizer step, as progress lines and bars show it."""

    step: int
    total: int
    loss: float
    user_loss: float | None  # cross-entropy on the user's answers in this batch
    anchor_kl: float | None  # the anchors' divergence from the base model in this batch


class FactQuestions(Protocol):
    """What `epoch_done` and `keeps_facts` ask, as prompts and verdicts on their answers.

    A batch of users (trainer/multi.py) answers every due user's prompts in
    shared generation batches instead of calling each user's hooks alone.
    """

    prompts: list[str]
    max_new_tokens: int

    def epoch_due(self, epoch: float) -> bool:
        """Whether early stopping asks at this point (epochs done: 2.5 is halfway through the third) at all."""
        ...

    def epoch_judged(self, epoch: float, answers: list[str]) -> bool:
        """`epoch_done`'s verdict on these answers: True stops."""
        ...

    def learned_every_fact(self) -> bool:
        """Whether the update as trained answered every held-out fact: one that never did is not shrunk at all."""
        ...

    def scale_judged(self, scale: float, answers: list[str]) -> bool:
        """`keeps_facts`' verdict on these answers (the update scaled by `scale`)."""
        ...


@dataclass(frozen=True)
class TrainHooks:
    """How a caller follows and steers a run; each is optional."""

    progress: Callable[[StepReport], None] | None = None  # after every step
    should_stop: Callable[[], bool] | None = None  # after every step: True checkpoints and raises TrainingInterrupted
    # At each check point (epochs done, `check_points`), model in eval mode: True stops (early stopping).
    epoch_done: Callable[[float, object], bool] | None = None
    keeps_facts: Callable[[object, float], bool] | None = None  # does the model, update scaled so, answer what was taught?
    seal: UserSeal | None = None  # encryption at rest: the checkpoints are sealed for the job's user
    questions: FactQuestions | None = None  # the two checks above as prompts: a batch of users answers them together


@dataclass
class RunState:
    """Where a run is: what a checkpoint saves, and what a resumed run starts from."""

    step: int = 0
    loss_curve: list[float] = field(default_factory=list)
    user_loss: list[float | None] = field(default_factory=list)
    anchor_kl: list[float | None] = field(default_factory=list)
    resumed_from_step: int = 0
    finished: bool = False  # resumed from the finished adapter: nothing left to train
    stopped_after_epoch: float | None = None  # epochs done (2.5: an early stop halfway through the third)
    stopped_by: str | None = None  # "early stopping" | "time budget"
    shrunk_to: float = 1.0
    tokens: int = 0

    @classmethod
    def resumed(cls, progress: Progress) -> RunState:
        curves = progress.loss_curves
        return cls(
            step=progress.step,
            loss_curve=list(progress.loss_curve),
            user_loss=list(curves.get("user", [])),
            anchor_kl=list(curves.get("anchor_kl", [])),
            resumed_from_step=progress.step,
            finished=progress.finished,
            stopped_after_epoch=progress.stopped_after_epoch,
            stopped_by=progress.stopped_by,
            shrunk_to=progress.shrunk_to,
        )

    def progress(self, finished: bool = False) -> Progress:
        return Progress(
            step=self.step,
            loss_curve=self.loss_curve,
            loss_curves={"user": self.user_loss, "anchor_kl": self.anchor_kl},
            finished=finished,
            stopped_after_epoch=self.stopped_after_epoch,
            stopped_by=self.stopped_by,
            shrunk_to=self.shrunk_to,
        )

    def record(self, loss: float, user_loss: float | None, anchor_kl: float | None, tokens: int) -> None:
        """One optimizer step done: its loss (and parts; None for a part the batch had none of) and tokens."""
        self.step += 1
        self.tokens += tokens
        self.loss_curve.append(round(loss, 5))
        self.user_loss.append(user_loss)
        self.anchor_kl.append(anchor_kl)

    def stop(self, epoch: float, why: str) -> None:
        self.stopped_after_epoch, self.stopped_by = epoch, why

    def result(self, adapter_dir: Path, seconds: float) -> TrainResult:
        curves = {"user": self.user_loss, "anchor_kl": self.anchor_kl}
        return TrainResult(
            adapter_dir=adapter_dir,
            steps=self.step,
            tokens=self.tokens,
            seconds=seconds,
            loss_curve=self.loss_curve,
            resumed_from_step=self.resumed_from_step,
            stopped_after_epoch=self.stopped_after_epoch,
            stopped_by=self.stopped_by,
            shrunk_to=self.shrunk_to,
            loss_curves=curves,
        )


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    tokens: int
    seconds: float
    loss_curve: list[float] = field(default_factory=list)
    resumed_from_step: int = 0
    stopped_after_epoch: float | None = None  # stopped before `epochs` (epochs done)...
    stopped_by: str | None = None  # ...by "early stopping" or "time budget"
    shrunk_to: float = 1.0  # the scale the adapter's update was shrunk to (see shrink_update)
    loss_curves: dict[str, list[float | None]] = field(default_factory=dict)  # "user", "anchor_kl" per step


@dataclass
class DecayPlan:
    """The step at which the learning rate reaches zero: every epoch's steps at first, then, with
    `anneal_within_budget`, the end of the last epoch the time budget allows, planned again after each epoch.

    A run the budget stops (most runs on a CPU: a ratings-only user's two
    epochs of eight) otherwise ended at 87% of the peak rate, its last
    weights as noisy as its middle ones; decayed to where it ends, the
    preference benchmark's versions kept retention 0.955 and 0.951 on average
    over six seeds against 0.928 (benchmarks/README.md, "a schedule that ends
    with the run").
    A resumed run plans anew after its next epoch: its time budget starts
    again with it."""

    steps: int
    schedule: Any = None  # the LambdaLR reading `steps` (`optimizer_and_schedule` sets it)

    def replan(self, steps: int) -> None:
        """Move the decay's end to `steps`, the rate of the next step with it."""
        self.steps, s = steps, self.schedule
        for group, base, rate in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas, strict=True):
            group["lr"] = base * rate(s.last_epoch)
        s._last_lr = [group["lr"] for group in s.optimizer.param_groups]  # as `step` leaves it: `get_last_lr` agrees


class TimeBudget:
    """`max_train_seconds`: no epoch starts that would, at the slowest pace so far, end past the budget.

    The slowest epoch and check set the pace, not the last ones: later epochs
    run longer (their checks generate longer answers), so the last one's pace
    let a run overrun. The shrink checks after training are reserved too.
    """

    def __init__(
        self, cfg: TrainConfig, started: float, shrink_checks: int, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        # `clock`: the run's own seconds; a run in a batch of users is charged its share of each shared step.
        self.cfg, self.started, self.shrink_checks, self.clock = cfg, started, shrink_checks, clock
        self.slowest_epoch = self.slowest_check = 0.0

    def note_check(self, seconds: float) -> None:
        self.slowest_check = max(self.slowest_check, seconds)

    def note_epoch(self, seconds: float) -> None:
        self.slowest_epoch = max(self.slowest_epoch, seconds)

    def epochs_that_fit(self, epochs_done: int) -> int:
        """The epochs the run will have done when `spent_after` stops it, at the slowest pace so far (`epochs`
        without a budget or a pace yet)."""
        cfg = self.cfg
        if cfg.max_train_seconds <= 0 or self.slowest_epoch <= 0:
            return cfg.epochs
        more = max(0, math.floor(self._seconds_left() / self.slowest_epoch))
        return min(cfg.epochs, max(cfg.min_epochs, epochs_done + more))

    def epoch_end(self, seconds: float, epochs_done: int, plan: DecayPlan, steps_per_epoch: int) -> bool:
        """Note an epoch's `seconds`, move the rate's decay to the end of the epochs that fit
        (`anneal_within_budget`), and say whether the budget ends the run now."""
        self.note_epoch(seconds)
        if self.cfg.anneal_within_budget:
            plan.replan(steps_per_epoch * self.epochs_that_fit(epochs_done))
        return self.spent_after(epochs_done)

    def spent_after(self, epochs_done: int) -> bool:
        cfg = self.cfg
        if cfg.max_train_seconds <= 0 or epochs_done < cfg.min_epochs or epochs_done >= cfg.epochs:
            return False
        return self._seconds_left() < self.slowest_epoch

    def _seconds_left(self) -> float:
        """The budget's seconds not yet spent, less those the shrink checks after training are reserved."""
        return self.cfg.max_train_seconds - (self.clock() - self.started) - self.shrink_checks * self.slowest_check


# ---- the recipe ------------------------------------------------------------------------ #


def train_adapter(
    model,
    tokenizer,
    device,
    examples: list[TrainingExample],
    cfg: TrainConfig,
    out_dir: Path,
    checkpoint_dir: Path | None = None,
    hooks: TrainHooks = TrainHooks(),
    init_adapter: Path | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `examples`; save it in PEFT format to `out_dir`.

    `init_adapter`: a PEFT adapter of the same shape to start from (the
    user's active version) instead of LoRA's zero update; a checkpoint to
    resume from wins over it. See `TrainHooks` for following and steering the run.
    """
    import torch

    if not examples:
        raise ModelError("nothing to train on: the dataset is empty")
    started = time.perf_counter()  # the base model's anchor states count as training time too
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    items = tokenize(tokenizer, supervised(examples, cfg.objective), cfg.max_seq_len)
    preferences = preference_items(tokenizer, examples, cfg.max_seq_len) if uses_preference(cfg.objective, examples) else []
    if not items and not preferences:
        raise ModelError(f"nothing to train on under objective {cfg.objective}: only disliked answers")
    steps_per_epoch = math.ceil(len(items) / cfg.batch_size) + math.ceil(len(preferences) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    pad = pad_id(tokenizer)
    peft_model = add_lora(model, cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules, cfg.top_layer_share)
    try:
        trained = [(name, p) for name, p in peft_model.named_parameters() if p.requires_grad]
        params = [p for _, p in trained]
        below = frozen_below(model.model, first_adapted_layer(name for name, _ in trained))
        matmuls = FrozenMatmuls.for_model(model, device, cfg.base_matmuls)  # the steps' precision (trainer/precision.py)
        # The anchors' base side of the KL once per run (adapter off); their frozen layers serve every step too.
        anchor_items = [t for t in items if t.anchor] if cfg.anchor_kl > 0 else []
        with peft_model.disable_adapter(), low_precision(matmuls):
            base_states = base_answer_states(model, anchor_items, pad, device, below=below) if anchor_items else None
        optimizer, schedule, plan = optimizer_and_schedule(params, cfg, total_steps)
        if init_adapter is not None:
            load_adapter_weights(peft_model, init_adapter)  # the preference reference: where the run starts
        with low_precision(matmuls):
            reference = reference_logps(peft_model, preferences, pad, device, below) if preferences else {}
        run = _resume_or_start(peft_model, optimizer, schedule, checkpoint_dir, hooks.seal)
        known = (base_states, below, reference)
        shrink_scales = sorted(s for s in cfg.shrink_to if 0 < s < 1) if hooks.keeps_facts is not None else []  # smallest first
        budget = TimeBudget(cfg, started, len(shrink_scales))
        peft_model.train()
        checks = check_points(steps_per_epoch, cfg.checks_per_epoch) if hooks.epoch_done is not None else {}
        for epoch in range(0 if run.finished else cfg.epochs):
            epoch_started = time.perf_counter()
            for index, batch in enumerate(epoch_batches(items, preferences, cfg.batch_size, seed=cfg.seed * 1000 + epoch)):
                step = epoch * steps_per_epoch + index + 1
                if step > run.step:  # (else done before the checkpoint we resumed from)
                    with low_precision(matmuls):
                        _train_step(peft_model, optimizer, schedule, params, batch, known, cfg, pad, device, run)
                    _after_step(peft_model, optimizer, run, total_steps, cfg, checkpoint_dir, hooks)
                # A check point resumed past is not asked again (the run did not stop there); one resumed at is.
                if index in checks and step == run.step and _check_epoch(peft_model, epoch + checks[index], hooks, budget):
                    run.stop(epoch + checks[index], "early stopping")
                    break
            if run.stopped_by is not None:
                break
            if budget.epoch_end(time.perf_counter() - epoch_started, epoch + 1, plan, steps_per_epoch):
                # A bounded wait per version is worth more than the last few facts; the gate judges what was learned.
                run.stop(epoch + 1, "time budget")
                break
        if shrink_scales and not run.finished:
            run.shrunk_to = _shrunk(peft_model, shrink_scales, hooks)
        seconds = time.perf_counter() - started
        if checkpoint_dir is not None and cfg.checkpoint_every and not run.finished:
            save_checkpoint(lora_state(peft_model), optimizer, run.progress(finished=True), checkpoint_dir, hooks.seal)
        save_adapter(peft_model, cfg, run, out_dir)
    finally:
        peft_model.unload()  # leave the kept base model as it was for the next job
    return run.result(out_dir, seconds)


# ---- its steps ------------------------------------------------------------------------ #

_FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch's fused AdamW runs for float weights


def optimizer_and_schedule(params, cfg: TrainConfig, total_steps: int):
    """AdamW with a short linear warm-up and a square-root decay to zero at `total_steps`, and the `DecayPlan`
    that moves that end.

    AdamW's fused kernel where torch has one for the weights' device: a LoRA
    has two small tensors per adapted module (420 on the default model), and
    the per-tensor loop spent 39 ms a step on them on this project's 2-core
    CPU against the fused kernel's 9 ms (the same update up to float rounding,
    7e-9 after 50 steps)."""
    import torch

    params, plan = list(params), DecayPlan(total_steps)
    fused = all(p.device.type in _FUSED_ADAMW_DEVICES and p.dtype.is_floating_point for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0, fused=fused or None)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * max(0.0, 1 - s / max(1, plan.steps)) ** 0.5,
    )
    plan.schedule = schedule
    return optimizer, schedule, plan


def _resume_or_start(peft_model, optimizer, schedule, checkpoint_dir: Path | None, seal: UserSeal | None) -> RunState:
    """A checkpoint's state (and the schedule wound forward to it), else the weights as they are (a warm start, or
    LoRA's zero update)."""
    from peft import set_peft_model_state_dict

    checkpoint = usable_checkpoint(checkpoint_dir, lora_state(peft_model), seal)
    if checkpoint is not None:
        progress, weights = load_checkpoint(optimizer, checkpoint, seal)
        set_peft_model_state_dict(peft_model, weights)
        run = RunState.resumed(progress)
        wind_forward(schedule, run.step)
        return run
    return RunState()


def wind_forward(schedule, steps: int) -> None:
    """The learning-rate schedule where a run resumed at `steps` had it."""
    with warnings.catch_warnings():  # replaying the schedule before any optimizer.step() here is intended
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            schedule.step()


def epoch_batches(
    items: list[Tokenized], preferences: list[PreferenceItem], batch_size: int, seed: int
) -> list[list[Tokenized] | list[PreferenceItem]]:
    """An epoch's supervised batches (`bucketed_batches`) with its preference batches placed among them at seeded
    positions; without preference items, exactly `bucketed_batches`."""
    batches: list = list(bucketed_batches(items, batch_size, seed))
    if not preferences:
        return batches
    rng = random.Random(seed + 1)
    order = list(preferences)
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        batches.insert(rng.randint(0, len(batches)), order[start : start + batch_size])
    return batches


def _train_step(
    peft_model,
    optimizer,
    schedule,
    params,
    batch: list,
    known: tuple[dict, FrozenBelow | None, dict],
    cfg: TrainConfig,
    pad: int,
    device,
    run: RunState,
) -> None:
    """One optimizer step on a supervised batch (answers' loss, anchors' KL) or a preference batch."""
    import torch

    base_states, below, reference = known  # computed once per run: anchors' base states, frozen layers, preference reference
    if batch and isinstance(batch[0], PreferenceItem):
        loss = preference_loss(peft_model, batch, reference, cfg.preference_losses, pad, device, below)
        _optimizer_step(loss * cfg.preference_weight, optimizer, schedule, params, cfg)
        run.record(loss.item(), None, None, sum(len(s.input_ids) for item in batch for s in item.sequences))
        return
    ids, mask, labels, weights = collate(batch, pad, device)
    anchors = torch.tensor([t.anchor for t in batch], device=device) if base_states else None
    base = base_states.for_rows(batch) if base_states else {}
    loss, per_row = answer_losses(
        peft_model, ids, mask, labels, weights, anchors, None, cfg.anchor_kl, cfg.anchor_divergence, below=below, **base
    )
    _optimizer_step(loss, optimizer, schedule, params, cfg)
    anchor_rows = torch.tensor([t.anchor for t in batch], device=device)
    user_loss, anchor_kl = loss_parts(per_row, weights, anchor_rows, cfg.anchor_kl)
    run.record(loss.item(), user_loss, anchor_kl, int(mask.sum()))


def _optimizer_step(loss, optimizer, schedule, params, cfg: TrainConfig) -> None:
    import torch

    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)


def _after_step(
    peft_model, optimizer, run: RunState, total_steps: int, cfg: TrainConfig, checkpoint_dir: Path | None, hooks: TrainHooks
) -> None:
    """Report progress, checkpoint on schedule, and stop (checkpointed) when asked to."""
    if hooks.progress is not None:
        hooks.progress(StepReport(run.step, total_steps, run.loss_curve[-1], run.user_loss[-1], run.anchor_kl[-1]))
    if checkpoint_dir is not None and cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step < total_steps:
        save_checkpoint(lora_state(peft_model), optimizer, run.progress(), checkpoint_dir, hooks.seal)
    if hooks.should_stop is not None and hooks.should_stop():
        if checkpoint_dir is not None:
            save_checkpoint(lora_state(peft_model), optimizer, run.progress(), checkpoint_dir, hooks.seal)
        raise TrainingInterrupted(f"stopped at step {run.step}/{total_steps}; checkpoint saved")


def _shrunk(peft_model, scales: list[float], hooks: TrainHooks) -> float:
    """`shrink_update` on the trained adapter (in eval mode, no gradients): the scale its update keeps."""
    import torch

    peft_model.eval()
    with torch.no_grad():
        lora_b = [p for name, p in peft_model.named_parameters() if "lora_B" in name]
        return shrink_update(peft_model, lora_b, scales, hooks.keeps_facts)


def check_points(steps_per_epoch: int, per_epoch: int) -> dict[int, float | int]:
    """Batch index within an epoch -> the epochs done after it, where early stopping checks: `per_epoch` points
    evenly spaced, the last one at the epoch's end (1 there, 0.5 halfway: a run that has learned its facts
    halfway through an epoch stops there instead of training the rest of it)."""
    points: dict[int, float | int] = {}
    for j in range(1, per_epoch + 1):
        index = math.ceil(steps_per_epoch * j / per_epoch) - 1
        if index >= 0:
            points[index] = 1 if j == per_epoch else j / per_epoch
    return points


def _check_epoch(peft_model, epoch: float, hooks: TrainHooks, budget: TimeBudget) -> bool:
    """Early stopping: the caller's check of the model after `epoch` epochs (in eval mode, no gradients)."""
    import torch

    assert hooks.epoch_done is not None
    peft_model.eval()
    check_started = time.perf_counter()
    with torch.no_grad():
        done = hooks.epoch_done(epoch, peft_model)
    budget.note_check(time.perf_counter() - check_started)
    peft_model.train()
    return bool(done)


def save_adapter(peft_model, cfg: TrainConfig, run: RunState, out_dir: Path) -> None:
    """The adapter in PEFT's format, with the run's config and loss curve beside it (training.json)."""
    peft_model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    weight = next(peft_model.parameters())
    products = effective(cfg.base_matmuls, weight.device, weight.dtype)  # what `auto` was on this machine
    (out_dir / "training.json").write_text(
        json.dumps({"config": asdict(cfg), "base_products": products, "loss_curve": run.loss_curve})
    )
