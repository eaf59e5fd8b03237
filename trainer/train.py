"""The training loop: LoRA on a kept base model, weighted loss on answers, checkpoints.

    result = train_adapter(model, tokenizer, device, examples, cfg, out_dir, checkpoint_dir)

Reads top to bottom: inject LoRA -> tokenize and bucket -> for each step:
forward, weighted loss on response tokens, backward, clip, AdamW step ->
every `checkpoint_every` steps write a checkpoint (adapter weights and
optimizer state in safetensors, progress in JSON) -> at the end save the
adapter in the PEFT format and remove LoRA, leaving the base model as it was.
A crashed run called again with the same checkpoint_dir resumes from its last
checkpoint. The last checkpoint is the finished adapter; the caller removes it
(`remove_checkpoint`) once the version is registered.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adaptloop.errors import ModelError
from schemas.training import TrainingExample
from trainer.data import bucketed_batches, collate, tokenize


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 8  # passes over the data
    learning_rate: float = 2e-3  # AdamW; LoRA tolerates a high rate on a small model
    batch_size: int = 4
    max_seq_len: int = 256
    seed: int = 0
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    top_layer_share: float = 0.5  # LoRA on this top share of the decoder layers; backward then stops below them
    checkpoint_every: int = 20  # optimizer steps between checkpoints; 0 disables
    max_grad_norm: float = 1.0
    warmup_steps: int = 2
    anchor_divergence: str = "symmetric"  # forward | reverse | symmetric KL (see anchor_divergence)
    anchor_kl: float = 4.0  # > 0: anchors are held to the base distribution by KL (this weight), not by cross-entropy
    early_stopping: bool = True  # stop after the epoch in which every held-out case is answered
    min_epochs: int = 2  # neither early stopping nor the time budget stops a run before this many epochs
    max_train_seconds: float = 120.0  # > 0: no epoch is started that would, at the slowest epoch's pace, end past this
    warm_start: bool = True  # a new version starts from the user's active adapter, not from zero
    shrink_to: tuple[float, ...] = (0.5, 0.75)  # after training, the smallest of these scales of the update that keeps the facts
    replay_per_fact: int = 1  # replayed examples kept per earlier fact; 0 keeps all


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    tokens: int
    seconds: float
    loss_curve: list[float] = field(default_factory=list)
    resumed_from_step: int = 0
    stopped_after_epoch: int | None = None  # stopped before `epochs`...
    stopped_by: str | None = None  # ...by "early stopping" or "time budget"
    shrunk_to: float = 1.0  # the scale the adapter's update was shrunk to (see shrink_update)


def _weighted_loss(logits, labels, weights):
    """Mean over each example's response tokens, then weighted across examples."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    per_token = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
    mask = (shift_labels != -100).float()
    per_example = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return (per_example * weights).sum() / weights.sum()


def _shared_prefix_len(ids, mask, labels) -> int:
    """How many leading tokens every row of the batch shares, none of them an answer position.

    Capped one short of the first answer token, so the shared part never has
    to predict anything itself.
    """
    same = ((ids == ids[:1]) & (mask == 1)).all(dim=0)
    common = int(same.int().cumprod(0).sum())
    answered = (labels != -100).any(dim=0).nonzero()
    first_answer = int(answered[0]) if len(answered) else ids.shape[1]
    return max(0, min(common, first_answer - 1))


def _predicting_states(decoder, ids, mask, labels):
    """(hidden, targets): the decoder's last hidden states at each position and the token each predicts.

    The rows of a batch share a long prefix (the chat template's system turn
    and the start of the user turn: 35% of the benchmark's tokens), so that
    prefix goes through the model once, as a batch of one, and its keys and
    values are broadcast to every row; only the rest is computed per row.
    Gradients flow through the broadcast cache into the prefix's LoRA
    weights, so the loss and its gradient are the full batch's, up to float
    rounding (the prefix shares one dropout mask across rows).
    """
    from transformers import DynamicCache

    prefix = _shared_prefix_len(ids, mask, labels) if ids.shape[0] > 1 else 0
    if prefix < 2:
        return decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1, :], labels[:, 1:]
    shared = DynamicCache(config=decoder.config)
    decoder(input_ids=ids[:1, :prefix], past_key_values=shared, use_cache=True)
    rows = ids.shape[0]
    broadcast = DynamicCache(
        ddp_cache_data=[(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1)) for layer in shared.layers],
        config=decoder.config,
    )
    hidden = decoder(input_ids=ids[:, prefix:], attention_mask=mask, past_key_values=broadcast, use_cache=True).last_hidden_state
    return hidden[:, :-1, :], labels[:, prefix + 1 :]


def anchor_divergence(adapted_logp, base_logp, divergence: str = "symmetric"):
    """Per-position divergence of the adapted from the base next-token distribution (log-probabilities in).

    forward KL(base || adapted) keeps the base model's likely tokens likely,
    but barely notices the adapter moving mass onto tokens the base model
    finds unlikely, which is how a user's facts leak into general answers
    ("The capital of Ireland is Lviv."); reverse KL(adapted || base) is large
    exactly there. "symmetric" is their sum.
    """
    forward = (base_logp.exp() * (base_logp - adapted_logp)).sum(dim=-1)
    if divergence == "forward":
        return forward
    reverse = (adapted_logp.exp() * (adapted_logp - base_logp)).sum(dim=-1)
    return reverse if divergence == "reverse" else forward + reverse


def base_answer_states(decoder, items, pad_id: int, device, batch_size: int = 8) -> dict[int, object]:
    """The base model's last hidden states at each answer-predicting position of `items`, keyed by id(item).

    Anchors are held to the base model's next-token distribution at these
    positions. The base model never changes during a run, so its states are
    computed once here instead of in a second forward pass at every step
    (a fifth of a step's time); the loss projects them to the vocabulary
    when it needs them. A few KB per anchor, where the distributions
    themselves would be 200 KB per position.
    """
    import torch

    states: dict[int, object] = {}
    ordered = sorted(items, key=lambda t: len(t.input_ids))
    was_training = decoder.training
    decoder.eval()  # the distribution the base model answers with: no dropout
    with torch.no_grad():
        for start in range(0, len(ordered), batch_size):
            batch = ordered[start : start + batch_size]
            ids, mask, labels, _ = collate(batch, pad_id, device)
            hidden, targets = _predicting_states(decoder, ids, mask, labels)
            for row, item in enumerate(batch):
                states[id(item)] = hidden[row][targets[row] != -100]
    decoder.train(was_training)
    return states


def _answer_only_loss(peft_model, ids, mask, labels, weights, anchor_rows=None, base_hidden=None, kl_weight: float = 0.0,
                      divergence: str = "symmetric"):  # fmt: skip
    """The weighted loss, projecting to the vocabulary only where an answer token is predicted.

    The output projection (hidden x vocabulary: 576 x 49,152 for SmolLM2-135M)
    is a large share of a small model's compute, and with the loss on answers
    only, most positions' logits would be thrown away.

    With `kl_weight` > 0, the rows in `anchor_rows` (the anchor set's general
    prompts) are scored by a KL divergence from the base model's whole
    next-token distribution at each answer position (`base_hidden`: the base
    model's states there, from `base_answer_states`, in row order) instead of
    cross-entropy on the base model's greedy answer: the adapter is held to
    the base model's distribution there, not just to its top token.
    """
    import torch
    import torch.nn.functional as F

    causal_lm = peft_model.get_base_model()
    # (Dropping the mask on these right-padded batches gives the same loss but
    # measured 1.32x/1.36x against 1.41x with it, so the mask stays.)
    hidden, targets = _predicting_states(causal_lm.model, ids, mask, labels)
    keep = targets != -100
    logits = causal_lm.lm_head(hidden[keep]).float()
    per_token = F.cross_entropy(logits, targets[keep], reduction="none")
    rows = keep.nonzero(as_tuple=True)[0]
    if kl_weight > 0 and anchor_rows is not None and bool(anchor_rows.any()):
        anchor_tokens = anchor_rows[rows]  # row-major order, as in hidden[keep]
        if base_hidden is None or base_hidden.shape[0] != int(anchor_tokens.sum()):
            raise ModelError("anchor rows need the base model's states at each of their answer positions")
        with torch.no_grad():
            base_logp = F.log_softmax(causal_lm.lm_head(base_hidden).float(), dim=-1)
        kl = anchor_divergence(F.log_softmax(logits[anchor_tokens], dim=-1), base_logp, divergence)
        per_token = per_token.masked_scatter(anchor_tokens, kl * kl_weight)
    sums = torch.zeros(ids.shape[0], device=ids.device).index_add_(0, rows, per_token)
    counts = keep.sum(dim=1).clamp(min=1)
    per_example = sums / counts
    return (per_example * weights).sum() / weights.sum()


def _save_checkpoint(model, optimizer, step: int, loss_curve: list[float], checkpoint_dir: Path,
                     finished: bool = False, stopped_after_epoch: int | None = None, stopped_by: str | None = None,
                     shrunk_to: float = 1.0) -> None:
    """Write the checkpoint beside the old one, then swap: a kill at any point leaves one complete checkpoint.

    A `finished` checkpoint is the trained adapter itself: it stays until the
    caller has registered the version, so a kill during the gate does not mean
    training again.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    staging, previous = _checkpoint_siblings(checkpoint_dir)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}, staging / "adapter.safetensors")
    optim_tensors, optim_meta = {}, {"param_groups": optimizer.state_dict()["param_groups"], "state_keys": {}}
    for pid, state in optimizer.state_dict()["state"].items():
        optim_meta["state_keys"][str(pid)] = {}
        for name, value in state.items():
            if hasattr(value, "detach"):
                optim_tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                optim_meta["state_keys"][str(pid)][name] = value
    save_file(optim_tensors, staging / "optimizer.safetensors")
    # progress.json last: a directory without it is incomplete and never loaded.
    (staging / "progress.json").write_text(json.dumps({"step": step, "loss_curve": loss_curve, "optim": optim_meta,
                                                       "finished": finished, "stopped_after_epoch": stopped_after_epoch,
                                                       "stopped_by": stopped_by, "shrunk_to": shrunk_to}))  # fmt: skip
    if checkpoint_dir.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(checkpoint_dir, previous)
    os.replace(staging, checkpoint_dir)
    shutil.rmtree(previous, ignore_errors=True)


def _checkpoint_siblings(checkpoint_dir: Path) -> tuple[Path, Path]:
    """(staging, previous): where the next checkpoint is written, and where the last one waits during the swap."""
    return checkpoint_dir.with_name(checkpoint_dir.name + ".tmp"), checkpoint_dir.with_name(checkpoint_dir.name + ".old")


def resumable_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The complete checkpoint to resume from, if any (the previous one when a kill fell inside the swap)."""
    for candidate in (checkpoint_dir, _checkpoint_siblings(checkpoint_dir)[1]):
        if (candidate / "progress.json").is_file():
            return candidate
    return None


def remove_checkpoint(checkpoint_dir: Path) -> None:
    """Drop a job's checkpoint once its version is registered."""
    for path in (checkpoint_dir, *_checkpoint_siblings(checkpoint_dir)):
        shutil.rmtree(path, ignore_errors=True)


def _load_checkpoint(model, optimizer, checkpoint_dir: Path) -> dict:
    """Restore adapter and optimizer state (safetensors only, never pickle); return the progress record."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    progress = json.loads((checkpoint_dir / "progress.json").read_text())
    set_peft_model_state_dict(model, load_file(checkpoint_dir / "adapter.safetensors"))
    tensors = load_file(checkpoint_dir / "optimizer.safetensors")
    state: dict = {}
    for pid, scalars in progress["optim"]["state_keys"].items():
        state[int(pid)] = dict(scalars)
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": progress["optim"]["param_groups"]})
    return progress


def _load_adapter_weights(peft_model, adapter_dir: Path) -> None:
    """Start from a saved adapter's weights; every LoRA weight of the new model must be in it."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    expected = get_peft_model_state_dict(peft_model)
    if set(weights) != set(expected) or any(weights[k].shape != v.shape for k, v in expected.items()):
        raise ModelError(f"{adapter_dir}: its LoRA weights do not fit this run's LoRA shape (rank or target modules differ)")
    set_peft_model_state_dict(peft_model, weights)


def train_adapter(
    model,
    tokenizer,
    device,
    examples: list[TrainingExample],
    cfg: TrainConfig,
    out_dir: Path,
    checkpoint_dir: Path | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    epoch_done: Callable[[int, object], bool] | None = None,
    init_adapter: Path | None = None,
    keeps_facts: Callable[[object, float], bool] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `examples`; save it in PEFT format to `out_dir`.

    `init_adapter`: a PEFT adapter of the same shape to start from (the
    user's active version) instead of LoRA's zero update; a checkpoint to
    resume from wins over it.

    `epoch_done(epoch, peft_model)` runs after each epoch (the model in eval
    mode); returning True stops training there (early stopping) and the
    adapter is saved as it is.

    `keeps_facts(peft_model, scale)`: whether the model, its update scaled by
    `scale`, still answers what the run taught; with it, the update is shrunk
    afterwards (`shrink_update`).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    if not examples:
        raise ModelError("nothing to train on: the dataset is empty")
    started = time.perf_counter()  # the base model's anchor states count as training time too
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    items = tokenize(tokenizer, examples, cfg.max_seq_len)
    steps_per_epoch = math.ceil(len(items) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    anchor_items = [t for t in items if t.anchor] if cfg.anchor_kl > 0 else []
    base_states = base_answer_states(model.model, anchor_items, pad, device) if anchor_items else {}

    layers = model.config.num_hidden_layers
    adapted = max(1, round(cfg.top_layer_share * layers))
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                      layers_to_transform=list(range(layers - adapted, layers)) if adapted < layers else None,
                      task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(model, lora)
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * max(0.0, 1 - s / max(1, total_steps)) ** 0.5,
        )
        step, loss_curve, resumed, stopped_early, stopped_by, finished, shrunk_to = 0, [], 0, None, None, False, 1.0
        checkpoint = resumable_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
        if checkpoint is not None:
            progress_record = _load_checkpoint(peft_model, optimizer, checkpoint)
            step, loss_curve = int(progress_record["step"]), list(progress_record["loss_curve"])
            finished, stopped_early = bool(progress_record.get("finished")), progress_record.get("stopped_after_epoch")
            stopped_by, shrunk_to = progress_record.get("stopped_by"), float(progress_record.get("shrunk_to", 1.0))
            resumed = step
            with warnings.catch_warnings():  # replaying the schedule before any optimizer.step() here is intended
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(step):
                    schedule.step()
        elif init_adapter is not None:
            _load_adapter_weights(peft_model, init_adapter)
        peft_model.train()
        tokens = 0
        # The slowest epoch and check so far set the pace: later epochs run longer (their checks
        # generate longer answers), so the last one's pace let a run overrun its budget.
        slowest_epoch = slowest_check = 0.0  # each shrink step costs one more check
        shrink_scales = sorted(s for s in cfg.shrink_to if 0 < s < 1) if keeps_facts is not None else []  # smallest first
        for epoch in range(0 if finished else cfg.epochs):
            epoch_started = time.perf_counter()
            batches = bucketed_batches(items, cfg.batch_size, seed=cfg.seed * 1000 + epoch)
            for index, batch in enumerate(batches):
                if epoch * steps_per_epoch + index < step:
                    continue  # done before the checkpoint we resumed from
                ids, mask, labels, weights = collate(batch, pad, device)
                anchors = torch.tensor([t.anchor for t in batch], device=device) if base_states else None
                base_hidden = torch.cat([base_states[id(t)] for t in batch if t.anchor]) if anchors is not None and anchors.any() else None
                loss = _answer_only_loss(peft_model, ids, mask, labels, weights, anchors, base_hidden, cfg.anchor_kl,
                                         cfg.anchor_divergence)  # fmt: skip
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += int(mask.sum())
                loss_curve.append(round(loss.item(), 5))
                if progress is not None:
                    progress(step, total_steps, loss_curve[-1])
                if checkpoint_dir is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                    _save_checkpoint(peft_model, optimizer, step, loss_curve, checkpoint_dir)
                if should_stop is not None and should_stop():
                    if checkpoint_dir is not None:
                        _save_checkpoint(peft_model, optimizer, step, loss_curve, checkpoint_dir)
                    raise InterruptedError(f"stopped at step {step}/{total_steps}; checkpoint saved")
            if epoch_done is not None and step == (epoch + 1) * steps_per_epoch:
                peft_model.eval()
                check_started = time.perf_counter()
                with torch.no_grad():
                    done = epoch_done(epoch + 1, peft_model)
                slowest_check = max(slowest_check, time.perf_counter() - check_started)
                peft_model.train()
                if done:
                    stopped_early, stopped_by = epoch + 1, "early stopping"
                    break
            now = time.perf_counter()
            slowest_epoch = max(slowest_epoch, now - epoch_started)
            if (cfg.max_train_seconds > 0 and epoch + 1 >= cfg.min_epochs and epoch + 1 < cfg.epochs
                    and (now - started) + slowest_epoch + len(shrink_scales) * slowest_check > cfg.max_train_seconds):  # fmt: skip
                # Another epoch as slow as the slowest yet (and the shrink checks after it) would end past the budget:
                # a bounded wait per version is worth more than the last few facts; the gate judges
                # what was learned.
                stopped_early, stopped_by = epoch + 1, "time budget"
                break
        if shrink_scales and not finished:
            peft_model.eval()
            with torch.no_grad():
                shrunk_to = shrink_update(peft_model, shrink_scales, keeps_facts)
        seconds = time.perf_counter() - started
        if checkpoint_dir is not None and cfg.checkpoint_every and not finished:
            _save_checkpoint(peft_model, optimizer, step, loss_curve, checkpoint_dir, finished=True,
                             stopped_after_epoch=stopped_early, stopped_by=stopped_by, shrunk_to=shrunk_to)  # fmt: skip
        peft_model.eval()
        out_dir.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(out_dir, safe_serialization=True)
        (out_dir / "training.json").write_text(json.dumps({"config": asdict(cfg), "loss_curve": loss_curve}))
    finally:
        # Leave the kept base model as it was for the next job.
        peft_model.unload()
    return TrainResult(out_dir, step, tokens, seconds, loss_curve, resumed, stopped_early, stopped_by, shrunk_to)


def shrink_update(peft_model, scales: list[float], keeps_facts: Callable[[object, float], bool]) -> float:
    """Scale the adapter's update (LoRA's B matrices) by the first of `scales` (smallest first) that `keeps_facts`; return it.

    Early stopping leaves the update just large enough to answer the facts,
    and the drift of general answers grows with its size; a smaller multiple
    often answers them all the same. 1.0 (the update as trained) when no
    smaller one does.
    """
    lora_b = [p for name, p in peft_model.named_parameters() if "lora_B" in name]
    trained = [p.detach().clone() for p in lora_b]
    for scale in scales:
        for param, weights in zip(lora_b, trained):
            param.copy_(weights * scale)
        if keeps_facts(peft_model, scale):
            return scale
    for param, weights in zip(lora_b, trained):
        param.copy_(weights)
    return 1.0


def generate(model, tokenizer, device, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy answer to one user prompt, with the chat template."""
    return generate_batch(model, tokenizer, device, [prompt], max_new_tokens)[0]


def generate_batch(model, tokenizer, device, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 16) -> list[str]:
    """Greedy answers to many prompts, `batch_size` at a time (left-padded, so every answer starts at the same column)."""
    import torch

    from trainer.data import chat_ids

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [chat_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(e) for e in encoded)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return answers
