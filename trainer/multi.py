"""Many users' adapters trained together: one forward/backward over the kept base model per step.

    runs = [UserRun(user_id, examples, out_dir, checkpoint_dir, hooks, init_adapter), ...]
    results = train_adapters(model, tokenizer, device, runs, cfg)   # a TrainResult or the user's error, in order

Every step, each user still training adds its next batch (the batch it would
have had alone: same examples, same order) and the rows of all of them go
through the base model once. Forward hooks on the adapted linear layers add
each row's own user's LoRA update: each run of a user's rows (a user's rows
are next to each other) through that user's A and B, so a row costs one
user's LoRA whatever the number of users, and a user's weights get
gradients from that user's rows alone.

Everything else is per user, as `train_adapter` does it alone: AdamW and its
schedule, gradient clipping, checkpoints (interchangeable with a lone run's)
and resume, progress, early stopping, the time budget (charged a share of
each shared step), the shrink step, and a standard PEFT adapter directory.
The users' checks are asked together: the early-stopping checks due after the
same step and the shrink step's checks at each scale are answered in shared
mixed-adapter generation batches (the users' FactQuestions; each sees the
answers it would get alone, up to float rounding), not one user at a time.
One user's failure or stop ends that user's run only. Each user's loss is its
own mean, and the optimized sum of them gives each user's weights exactly
the gradient of its own loss, so a user learns what it would learn alone up
to float rounding and LoRA dropout's random masks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import ModelError, TrainingInterrupted
from schemas.manifest import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from schemas.training import TrainingExample
from trainer.checkpoint import load_checkpoint, save_checkpoint, usable_checkpoint
from trainer.data import Tokenized, bucketed_batches, collate, even_slices, tokenize
from trainer.frozen import first_adapted_layer, frozen_below
from trainer.generation import pad_id
from trainer.lora import add_lora, lora_state, read_fitting_weights, shrink_update
from trainer.loss import BaseAnswers, RowUsers, answer_losses, base_answer_states, loss_parts
from trainer.precision import FrozenMatmuls, low_precision
from trainer.preference import supervised, uses_preference
from trainer.train import (
    DecayPlan,
    FactQuestions,
    RunState,
    StepReport,
    TimeBudget,
    TrainConfig,
    TrainHooks,
    TrainResult,
    check_points,
    optimizer_and_schedule,
    save_adapter,
    train_adapter,
    wind_forward,
)

_A, _B = ".lora_A.weight", ".lora_B.weight"

# How several users' rows meet their adapters in one batch: "split" (one pair of products per run of a user's
# rows: the least arithmetic, measured on a CPU), "gathered" (each row's A and B gathered, one batched pair of
# products: a fixed number of operations whatever the number of users, for a GPU), "auto" (gathered on CUDA).
LORA_ROWS = ("auto", "split", "gathered")


@dataclass
class UserRun:
    """One user's part of a batched run: what `train_adapter` takes for a run alone."""

    user_id: str
    examples: list[TrainingExample]
    out_dir: Path
    checkpoint_dir: Path | None = None
    hooks: TrainHooks = field(default_factory=TrainHooks)
    init_adapter: Path | None = None  # warm start (a checkpoint wins over it)


class UserLoras:
    """Trainable LoRA weights per user, added to the rows of each user by forward hooks on the base model.

    `through(users)`: row i of the forward passes inside goes through user
    `users[i]`'s adapter (it yields `narrow(kept)`: only those rows go on, as
    when finished rows leave a generation batch); a user's rows should be
    next to each other (one pair of products per run of a user's rows).
    `alone(user)`: every row through that user's (for generation, whatever
    the batch's size). Outside both the base model is itself.
    """

    def __init__(self, model, initial: dict, scaling: float, dropout: float, rows: str = "auto") -> None:
        """`rows`: how a batch of several users' rows meets their adapters (`LORA_ROWS`)."""
        if rows not in LORA_ROWS:
            raise ModelError(f"LoRA rows {rows!r}: expected one of {', '.join(LORA_ROWS)}")
        self.keys = list(initial)  # PEFT's names, in PEFT's parameter order (checkpoints stay interchangeable)
        self.modules = [k.removeprefix("base_model.model.").removesuffix(_A) for k in self.keys if k.endswith(_A)]
        self.rank = int(initial[next(k for k in self.keys if k.endswith(_A))].shape[0])
        self.scaling, self.dropout, self.training = scaling, dropout, True
        on_gpu = next(iter(initial.values())).device.type == "cuda"
        self.gathered = rows == "gathered" or (rows == "auto" and on_gpu)
        self.weights: list[dict[str, object]] = []  # per user: PEFT name -> parameter
        self._rows: tuple[int, ...] | None = None
        self._runs: list[tuple[int, int, int]] | None = None  # (user, first row, end row): each run of one user's rows
        self._index: tuple[list[int], object] | None = None  # gathered: the users present, each row's place among them
        self.handles = [model.get_submodule(name).register_forward_hook(self._hook(name)) for name in self.modules]

    def add(self, weights: dict) -> int:
        """A new user starting from `weights` (PEFT names); returns the user's index."""
        import torch

        self.weights.append({k: torch.nn.Parameter(weights[k].detach().clone()) for k in self.keys})
        return len(self.weights) - 1

    def params(self, user: int) -> list:
        return [self.weights[user][k] for k in self.keys]

    def state(self, user: int) -> dict:
        return {k: p.detach() for k, p in self.weights[user].items()}

    @contextmanager
    def through(self, users: Sequence[int]) -> Iterator[Callable[[Sequence[int]], None]]:
        self._route(tuple(users))
        try:
            yield self._narrow
        finally:
            self._rows, self._runs = None, None

    def _narrow(self, kept: Sequence[int]) -> None:
        """Only rows `kept` (indices into the current rows, in order) go on through their users' adapters."""
        assert self._rows is not None, "narrow() inside through() only"
        self._route(tuple(self._rows[i] for i in kept))

    def _route(self, users: tuple[int, ...]) -> None:
        runs: list[tuple[int, int, int]] = []
        for row, user in enumerate(users):
            if runs and runs[-1][0] == user:
                runs[-1] = (user, runs[-1][1], row + 1)
            else:
                runs.append((user, row, row + 1))
        self._rows, self._runs, self._index = users, runs, None

    def _row_index(self, device):
        """The users present in the rows, and each row's place among them (a tensor on `device`): built once a route."""
        import torch

        if self._index is None:
            assert self._rows is not None
            present = sorted(set(self._rows))
            place = {user: i for i, user in enumerate(present)}
            self._index = (present, torch.tensor([place[user] for user in self._rows], device=device))
        return self._index

    @contextmanager
    def alone(self, user: int) -> Iterator[None]:
        self._rows, self._runs = None, [(user, 0, -1)]  # one run: every row, whatever the batch's size
        try:
            yield
        finally:
            self._runs = None

    def _hook(self, module_name: str):
        import torch
        import torch.nn.functional as F

        from trainer.dropout import sparse_dropout

        key_a, key_b = f"base_model.model.{module_name}{_A}", f"base_model.model.{module_name}{_B}"

        def add_each_rows_lora(_module, inputs, output):
            runs = self._runs
            if runs is None:
                return None
            x = sparse_dropout(inputs[0], self.dropout) if self.training else inputs[0]
            # On a bfloat16 (or 4-bit) base PEFT keeps LoRA weights in float32 and casts the input to them, and the
            # update back to the layer's dtype (its autocast_adapter_dtype): the same products here.
            x = x.to(self.weights[runs[0][0]][key_a].dtype)
            # The scaling goes on the rank-r middle, not on the layer-wide product: one full-width multiply
            # less per adapted module, forward and backward.
            if len(runs) == 1:  # one user for every row: PEFT's `lora_B(lora_A(dropout(x))) * scaling`
                user = self.weights[runs[0][0]]
                return output + F.linear(F.linear(x, user[key_a]) * self.scaling, user[key_b]).to(output.dtype)
            if self.gathered:
                return output + self._gathered_update(x, key_a, key_b).to(output.dtype)
            # Each run of rows through its own user's A and B: a row costs one user's LoRA, whatever the
            # number of users. (All users' A and B side by side and a mask per row, as serving/lora.py does,
            # made every row pay for every user's: about 1.3 M multiply-adds per token and layer at K = 8 and
            # r = 16 on top of the base layer's 3.5 M; the same 8 users' K = 8 batch took 527 s then, 483 s now.)
            # (`split`, not a slice per run: a slice's backward writes its gradient into zeros as large as
            # the whole input, one such tensor per run and module; the split's backward is one `cat`.)
            pieces = x.split([end - first for _, first, end in runs])
            parts = [
                F.linear(F.linear(piece, self.weights[u][key_a]) * self.scaling, self.weights[u][key_b])
                for (u, _, _), piece in zip(runs, pieces)
            ]
            return output + torch.cat(parts).to(output.dtype)

        return add_each_rows_lora

    def _gathered_update(self, x, key_a: str, key_b: str):
        """Every row through its own user's A and B in one batched product per side, whatever the number of users.

        The same products as one pair per run of a user's rows, in a fixed number of operations per layer
        instead of three per user: on a GPU, where a small model's step costs its kernel launches, K = 32
        would otherwise launch ~100 per adapted layer. Each row gets a copy of its user's A and B (r x width).
        """
        import torch

        present, index = self._row_index(x.device)
        a = torch.stack([self.weights[u][key_a] for u in present])[index]  # (rows, r, in)
        b = torch.stack([self.weights[u][key_b] for u in present])[index]  # (rows, out, r)
        rows = x if x.dim() == 3 else x.unsqueeze(1)
        update = torch.matmul(torch.matmul(rows, a.transpose(1, 2)) * self.scaling, b.transpose(1, 2))
        return update if x.dim() == 3 else update.squeeze(1)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def read_lora(adapter_dir: Path, like=None) -> tuple[dict, float]:
    """A saved PEFT LoRA adapter's weights (PEFT's names; on `like`'s device and dtype) and its scaling."""
    import json

    from safetensors.torch import load_file

    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    weights = load_file(Path(adapter_dir) / ADAPTER_WEIGHTS)
    if like is not None:
        weights = {k: v.to(device=like.device, dtype=like.dtype) for k, v in weights.items()}
    return weights, (alpha / r**0.5 if config.get("use_rslora") else alpha / r)


def stacked_loras(model, adapters: list[tuple[dict, float]], rows: str = "auto") -> UserLoras:
    """Saved adapters of one LoRA shape on `model` for inference: `through(users)` sends each row through its own."""
    weights, scaling = adapters[0]
    loras = UserLoras(model, weights, scaling, dropout=0.0, rows=rows)
    loras.training = False
    for adapter, _ in adapters:
        loras.add(adapter)
    return loras


@dataclass
class _Member:
    """A user's run inside the batch: its data, optimizer, state and clock."""

    run: UserRun
    index: int
    items: list[Tokenized]
    steps_per_epoch: int
    total_steps: int
    optimizer: object
    plan: DecayPlan  # its `schedule` is the member's learning-rate schedule
    state: RunState
    budget: TimeBudget
    spent: float = 0.0  # this user's seconds: a share of every shared step, all of its own checks
    batches: Iterator[list[Tokenized] | _EpochCheck] | None = None
    result: TrainResult | Exception | None = None
    stop_now: bool = False  # the verdict of its last early-stopping check, answered with the other users'


@dataclass(frozen=True)
class _EpochCheck:
    """What a user's epochs yield when its early-stopping check is due: the batch answers it with the others' checks."""

    epoch: float


def train_adapters(model, tokenizer, device, runs: list[UserRun], cfg: TrainConfig) -> list[TrainResult | Exception]:
    """Train every run's adapter in shared steps; per run, its TrainResult or the error that ended it (in order)."""

    if not runs:
        return []
    alone = [i for i, run in enumerate(runs) if uses_preference(cfg.objective, run.examples)]
    if alone:  # the preference steps (trainer/preference.py) have no batched form yet: those users train alone
        together = [run for i, run in enumerate(runs) if i not in alone]
        shared = iter(train_adapters(model, tokenizer, device, together, cfg))
        return [_train_alone(model, tokenizer, device, run, cfg) if i in alone else next(shared) for i, run in enumerate(runs)]
    pad = pad_id(tokenizer)
    initial, peft_config = _initial_lora(model, cfg)
    loras = UserLoras(model, initial, peft_config.lora_alpha / peft_config.r, cfg.dropout, cfg.lora_rows)
    results: list[TrainResult | Exception | None] = [None] * len(runs)
    try:
        members = []
        for i, run in enumerate(runs):
            try:
                members.append(_join(model, tokenizer, device, run, cfg, loras, initial, pad))
            except Exception as exc:  # this user's data or files: the others go on
                results[i] = exc
        below = frozen_below(model.model, first_adapted_layer(loras.modules))
        matmuls = FrozenMatmuls.for_model(model, device, cfg.base_matmuls)  # the steps' precision (trainer/precision.py)
        with low_precision(matmuls):
            base_states = _shared_base_states(model, members, cfg, pad, device, below)
        model.train()
        active = list(members)
        while active:
            stepping, checking = [], []
            for member in active:
                batch = _next_batch(member, model, loras)
                if isinstance(batch, _EpochCheck):
                    checking.append((member, batch))
                elif batch is not None:
                    stepping.append((member, batch))
            for member in [m for m in active if m.batches is None or m.result is not None]:
                active.remove(member)
            _check_together(checking, model, tokenizer, device, loras, cfg)
            if not stepping:
                continue
            started = time.perf_counter()
            with low_precision(matmuls):
                _shared_step(model, loras, stepping, (base_states, below), cfg, pad, device)
            share = (time.perf_counter() - started) / len(stepping)
            for member, _ in stepping:
                member.spent += share
                _after_step(member, loras, cfg)
                if member.result is not None:
                    active.remove(member)
        _shrink_together([m for m in members if m.result is None], model, tokenizer, device, loras, cfg)
        finishing = [m for m in members if m.result is None]  # trained to its end (not failed, not stopped)
        for member in finishing:
            _finish(member, model, loras, cfg)
        _save_adapters([m for m in finishing if m.result is None], model, loras, cfg)
        for member in members:
            results[runs.index(member.run)] = member.result
    finally:
        loras.remove()  # the kept base model as it was
        model.eval()
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def _train_alone(model, tokenizer, device, run: UserRun, cfg: TrainConfig) -> TrainResult | Exception:
    try:
        return train_adapter(
            model, tokenizer, device, run.examples, cfg, run.out_dir, run.checkpoint_dir, run.hooks, run.init_adapter
        )
    except Exception as exc:  # this user's data or files: the others' results stand
        return exc


# ---- setting up ------------------------------------------------------------------------- #


def _initial_lora(model, cfg: TrainConfig):
    """The LoRA weights a run alone starts from (PEFT's initialisation under the run's seed) and PEFT's config."""
    import torch

    torch.manual_seed(cfg.seed)
    peft_model = add_lora(model, cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules, cfg.top_layer_share)
    try:
        return {k: v.detach().clone() for k, v in lora_state(peft_model).items()}, peft_model.peft_config["default"]
    finally:
        peft_model.unload()


def _join(model, tokenizer, device, run: UserRun, cfg: TrainConfig, loras: UserLoras, initial: dict, pad: int) -> _Member:
    """A user's member: tokenized data, weights (checkpoint, warm start or PEFT's start), optimizer and schedule."""
    if not run.examples:
        raise ModelError("nothing to train on: the dataset is empty")
    items = tokenize(tokenizer, supervised(run.examples, cfg.objective), cfg.max_seq_len)
    if not items:
        raise ModelError(f"nothing to train on under objective {cfg.objective}: only disliked answers")
    steps_per_epoch = math.ceil(len(items) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    checkpoint = usable_checkpoint(run.checkpoint_dir, initial, run.hooks.seal)
    start = initial
    if checkpoint is None and run.init_adapter is not None:
        start = read_fitting_weights(run.init_adapter, initial)
    index = loras.add(start)
    optimizer, schedule, plan = optimizer_and_schedule(loras.params(index), cfg, total)
    state = RunState()
    if checkpoint is not None:
        progress, weights = load_checkpoint(optimizer, checkpoint, run.hooks.seal)
        import torch

        with torch.no_grad():
            for key, param in loras.weights[index].items():
                param.copy_(weights[key])
        state = RunState.resumed(progress)
        wind_forward(schedule, state.step)
    hooks = run.hooks
    shrink_checks = len([s for s in cfg.shrink_to if 0 < s < 1]) if hooks.keeps_facts is not None else 0
    member = _Member(run, index, items, steps_per_epoch, total, optimizer, plan, state, None)  # type: ignore[arg-type]
    member.budget = TimeBudget(cfg, 0.0, shrink_checks, clock=lambda: member.spent)
    member.batches = _epochs(member, model, loras, cfg)
    return member


def _shared_base_states(model, members: list[_Member], cfg: TrainConfig, pad: int, device, below) -> BaseAnswers:
    """The base model's side of the anchors' KL, once per distinct anchor for the whole batch
    (and the frozen layers' outputs for them, `below`, once for every user's steps)."""
    if cfg.anchor_kl <= 0:
        return BaseAnswers({}, logp=False)
    distinct: dict[tuple, Tokenized] = {}
    alias: dict[int, int] = {}  # id(a member's anchor item) -> id(the distinct item alike)
    for member in members:
        for item in member.items:
            if item.anchor:
                alias[id(item)] = id(distinct.setdefault((tuple(item.input_ids), tuple(item.labels)), item))
    if not distinct:
        return BaseAnswers({}, logp=False)
    return base_answer_states(model, list(distinct.values()), pad, device, below=below).shared(alias)


# ---- each user's epochs ------------------------------------------------------------------- #


def _epochs(member: _Member, model, loras: UserLoras, cfg: TrainConfig) -> Iterator[list[Tokenized] | _EpochCheck]:
    """The user's batches, epoch by epoch as a run alone has them; early stopping and the budget in between."""
    state, hooks = member.state, member.run.hooks
    checks = check_points(member.steps_per_epoch, cfg.checks_per_epoch) if hooks.epoch_done is not None else {}
    for epoch in range(0 if state.finished else cfg.epochs):
        epoch_started = member.spent
        for index, batch in enumerate(bucketed_batches(member.items, cfg.batch_size, seed=cfg.seed * 1000 + epoch)):
            step = epoch * member.steps_per_epoch + index + 1
            if step > state.step:  # (else done before the checkpoint we resumed from)
                yield batch  # resumed here once the shared step has run it
            # As `train_adapter`: a check point resumed past is not asked again; one resumed at is.
            if index in checks and step == state.step:
                done = yield from _early_stopping(member, model, loras, epoch + checks[index])
                if done:
                    state.stop(epoch + checks[index], "early stopping")
                    return
        if member.budget.epoch_end(member.spent - epoch_started, epoch + 1, member.plan, member.steps_per_epoch):
            state.stop(epoch + 1, "time budget")
            return


def _early_stopping(member: _Member, model, loras: UserLoras, epochs_done: float) -> Iterator[_EpochCheck]:
    """Whether the user's check at `epochs_done` stops it: its questions are answered with the other users'
    due checks (`_check_together`, after this yields), or its own `epoch_done` hook runs alone."""
    hooks = member.run.hooks
    if hooks.questions is not None:
        member.stop_now = False
        if hooks.questions.epoch_due(epochs_done):
            yield _EpochCheck(epochs_done)
        return member.stop_now
    checked = time.perf_counter()
    with _evaluating(model, loras), loras.alone(member.index):
        done = hooks.epoch_done(epochs_done, model)
    member.spent += time.perf_counter() - checked
    member.budget.note_check(time.perf_counter() - checked)
    return bool(done)


def _next_batch(member: _Member, model, loras: UserLoras) -> list[Tokenized] | _EpochCheck | None:
    """The user's next batch (or its due check); None when its training is over (its iterator is dropped) or it failed."""
    if member.batches is None:
        return None
    try:
        return next(member.batches)
    except StopIteration:
        member.batches = None
    except Exception as exc:  # its own check failed: this user only
        member.batches, member.result = None, exc
    return None


# ---- the users' checks, answered together ---------------------------------------------------- #


def _answers_together(model, tokenizer, device, loras: UserLoras, members: list[_Member], batch_size: int) -> list[list[str]]:
    """Each member's fact prompts answered through its own adapter, every member's rows in shared batches (at
    most `batch_size` prompts each, the gate's `validation.batch_size`: a step costs little more for more rows)."""
    from trainer.generation import generate_batch

    questions = [_questions(member) for member in members]
    asked = [(member.index, prompt, q.max_new_tokens) for member, q in zip(members, questions) for prompt in q.prompts]
    answers: list[str] = []
    with _evaluating(model, loras):
        for part in even_slices(len(asked), batch_size):
            users, prompts, limits = zip(*asked[part])
            rows = RowUsers(users, loras.through)
            answers += generate_batch(model, tokenizer, device, list(prompts), limits, batch_size, rows)
    out, start = [], 0
    for q in questions:
        out.append(answers[start : start + len(q.prompts)])
        start += len(q.prompts)
    return out


def _questions(member: _Member) -> FactQuestions:
    assert member.run.hooks.questions is not None
    return member.run.hooks.questions


def _check_together(
    checking: list[tuple[_Member, _EpochCheck]], model, tokenizer, device, loras: UserLoras, cfg: TrainConfig
) -> None:
    """The due early-stopping checks answered in shared batches; each member's verdict waits in `stop_now`."""
    if not checking:
        return
    started = time.perf_counter()
    answers = _answers_together(model, tokenizer, device, loras, [member for member, _ in checking], cfg.answer_batch)
    share = (time.perf_counter() - started) / len(checking)
    for (member, check), mine in zip(checking, answers):
        member.spent += share
        member.budget.note_check(share)
        try:
            member.stop_now = _questions(member).epoch_judged(check.epoch, mine)
        except Exception as exc:  # its own check failed: this user only
            member.batches, member.result = None, exc


def _shrink_together(members: list[_Member], model, tokenizer, device, loras: UserLoras, cfg: TrainConfig) -> None:
    """`shrink_update` for every member that asks its facts as questions, each scale's answers in shared batches.

    Smallest scale first, as alone: a member keeps the first scale at which
    it still answers what it answered as trained, and leaves the others'
    batches; a member no scale suits gets its update back as trained.
    """
    scales = sorted(s for s in cfg.shrink_to if 0 < s < 1)
    pending = [m for m in members if _may_shrink(m)]
    if not scales or not pending:
        return
    trained = {m.index: {k: p.detach().clone() for k, p in loras.weights[m.index].items() if k.endswith(_B)} for m in pending}
    for scale in scales:
        if not pending:
            return
        _scale_update(loras, pending, trained, scale)
        started = time.perf_counter()
        answers = _answers_together(model, tokenizer, device, loras, pending, cfg.answer_batch)
        share = (time.perf_counter() - started) / len(pending)
        still = []
        for member, mine in zip(pending, answers):
            member.spent += share
            try:
                if _questions(member).scale_judged(scale, mine):
                    member.state.shrunk_to = scale
                else:
                    still.append(member)
            except Exception as exc:  # its own check failed: this user only
                member.result = exc
        pending = still
    _scale_update(loras, pending, trained, 1.0)  # no smaller update keeps their facts: as trained


def _may_shrink(member: _Member) -> bool:
    """Whether a member's update is tried at smaller scales: it asks its facts as questions (`keeps_facts`), its run
    is not finished (a finished one resumed was shrunk before) and, as alone, its update as trained answered every
    held-out fact (one that never did is kept as trained, without generating a scale's answers)."""
    hooks = member.run.hooks
    if hooks.questions is None or hooks.keeps_facts is None or member.state.finished:
        return False
    return hooks.questions.learned_every_fact()


def _scale_update(loras: UserLoras, members: list[_Member], trained: dict[int, dict], scale: float) -> None:
    import torch

    with torch.no_grad():
        for member in members:
            for key, weights in trained[member.index].items():
                loras.weights[member.index][key].copy_(weights * scale)


# ---- the shared step ---------------------------------------------------------------------- #


def _shared_step(model, loras: UserLoras, stepping, known: tuple, cfg: TrainConfig, pad: int, device) -> None:
    """One forward/backward over every user's batch; then each user's own clip, AdamW step and schedule."""
    import torch

    base_states, below = known  # what the batch computed once: the anchors' base states, the frozen layers' outputs

    rows = [item for _, batch in stepping for item in batch]
    users = tuple(member.index for member, batch in stepping for _ in batch)
    ids, mask, labels, weights = collate(rows, pad, device)
    anchors = torch.tensor([t.anchor for t in rows], device=device)
    _, per_row = answer_losses(
        model,
        ids,
        mask,
        labels,
        weights,
        anchors if base_states else None,
        kl_weight=cfg.anchor_kl,
        divergence=cfg.anchor_divergence,
        rows=RowUsers(users, loras.through),
        below=below,
        **base_states.for_rows(rows),
    )
    user_of_row = torch.tensor(users, device=device)
    losses = []
    for member, _ in stepping:
        mine = user_of_row == member.index
        losses.append((per_row[mine] * weights[mine]).sum() / weights[mine].sum())
    torch.stack(losses).sum().backward()  # each user's weights get the gradient of its own loss alone
    for (member, _), loss in zip(stepping, losses):
        mine = user_of_row == member.index
        params = loras.params(member.index)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        member.optimizer.step()
        member.plan.schedule.step()
        member.optimizer.zero_grad(set_to_none=True)
        user_loss, anchor_kl = loss_parts(per_row[mine], weights[mine], anchors[mine], cfg.anchor_kl)
        member.state.record(loss.item(), user_loss, anchor_kl, int(mask[mine].sum()))


def _after_step(member: _Member, loras: UserLoras, cfg: TrainConfig) -> None:
    """Progress, a checkpoint on schedule, and a stop when asked (checkpointed): as `train_adapter` does."""
    state, run, hooks = member.state, member.run, member.run.hooks
    try:
        if hooks.progress is not None:
            hooks.progress(
                StepReport(state.step, member.total_steps, state.loss_curve[-1], state.user_loss[-1], state.anchor_kl[-1])
            )
        every = cfg.checkpoint_every
        if run.checkpoint_dir is not None and every and state.step % every == 0 and state.step < member.total_steps:
            save_checkpoint(loras.state(member.index), member.optimizer, state.progress(), run.checkpoint_dir, hooks.seal)
        if hooks.should_stop is not None and hooks.should_stop():
            if run.checkpoint_dir is not None:
                save_checkpoint(loras.state(member.index), member.optimizer, state.progress(), run.checkpoint_dir, hooks.seal)
            raise TrainingInterrupted(f"stopped at step {state.step}/{member.total_steps}; checkpoint saved")
    except Exception as exc:
        member.batches, member.result = None, exc


# ---- finishing ---------------------------------------------------------------------------- #


def _finish(member: _Member, model, loras: UserLoras, cfg: TrainConfig) -> None:
    """Shrink the update and the finished checkpoint: this user's end of `train_adapter` before its adapter is
    written (`_save_adapters`); an error ends this user only (its `result`)."""
    state, run, hooks = member.state, member.run, member.run.hooks
    try:
        alone = hooks.keeps_facts is not None and hooks.questions is None  # else shrunk with the others' (`_shrink_together`)
        scales = sorted(s for s in cfg.shrink_to if 0 < s < 1) if alone else []
        if scales and not state.finished:
            lora_b = [p for k, p in loras.weights[member.index].items() if k.endswith(_B)]
            with _evaluating(model, loras), loras.alone(member.index):
                state.shrunk_to = shrink_update(model, lora_b, scales, hooks.keeps_facts)
        if run.checkpoint_dir is not None and cfg.checkpoint_every and not state.finished:
            save_checkpoint(
                loras.state(member.index), member.optimizer, state.progress(finished=True), run.checkpoint_dir, run.hooks.seal
            )
    except Exception as exc:
        member.result = exc


def _save_adapters(members: list[_Member], model, loras: UserLoras, cfg: TrainConfig) -> None:
    """Each member's weights as a standard PEFT adapter directory, written by PEFT itself, and its result.

    One PEFT wrapper for the whole batch, each user's weights loaded into it
    in turn, instead of wrapping the model and giving it back once per user."""
    if not members:
        return
    from peft import set_peft_model_state_dict

    peft_model = add_lora(model, cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules, cfg.top_layer_share)
    try:
        for member in members:
            try:
                set_peft_model_state_dict(peft_model, loras.state(member.index))
                save_adapter(peft_model, cfg, member.state, member.run.out_dir)
                member.result = member.state.result(member.run.out_dir, member.spent)
            except Exception as exc:  # this user's files: the others' adapters stand
                member.result = exc
    finally:
        peft_model.unload()


# ---- small helpers ------------------------------------------------------------------------ #


@contextmanager
def _evaluating(model, loras: UserLoras) -> Iterator[None]:
    """Eval mode and no gradients (a check between steps), then training mode again."""
    import torch

    model.eval()
    loras.training = False
    try:
        with torch.no_grad():
            yield
    finally:
        model.train()
        loras.training = True
