"""Checkpoints of a running job: adapter and optimizer state in safetensors, progress in JSON; never pickle.

    <registry>/checkpoints/<request_id>/
        adapter.safetensors     the LoRA weights so far
        optimizer.safetensors   AdamW's tensors
        progress.json           `Progress`: step, loss curves, optimizer scalars, how the run ended

A checkpoint is written beside the old one and swapped in, so a kill at any
point leaves one complete checkpoint. A `finished` checkpoint is the trained
adapter itself: it stays until the caller has registered the version, so a
kill during the gate does not mean training again. With encryption at rest
every file is sealed for the job's user (`seal`).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.encryption import UserSeal
from core.storage import open_sealed
from trainer.lora import same_lora_shape

PROGRESS = "progress.json"

log = logging.getLogger("adaptloop.trainer")


class Progress(BaseModel):
    """Where a run is; written last, so a directory without it is incomplete and never loaded."""

    model_config = ConfigDict(extra="ignore")

    step: int
    loss_curve: list[float] = Field(default_factory=list)
    loss_curves: dict[str, list[float | None]] = Field(default_factory=dict)
    optim: dict[str, Any] = Field(default_factory=dict, description="AdamW's param groups and non-tensor state")
    finished: bool = False
    stopped_after_epoch: int | float | None = None
    stopped_by: str | None = None
    shrunk_to: float = 1.0


def siblings(checkpoint_dir: Path) -> tuple[Path, Path]:
    """(staging, previous): where the next checkpoint is written, and where the last one waits during the swap."""
    return checkpoint_dir.with_name(checkpoint_dir.name + ".tmp"), checkpoint_dir.with_name(checkpoint_dir.name + ".old")


def _write(path: Path, data: bytes, seal: UserSeal | None) -> None:
    path.write_bytes(seal.seal(data) if seal is not None else data)


def _read(path: Path, seal: UserSeal | None) -> bytes:
    return seal.open(path.read_bytes(), path) if seal is not None else open_sealed(path.read_bytes(), None, path)


def save_checkpoint(
    weights: dict[str, Any], optimizer, progress: Progress, checkpoint_dir: Path, seal: UserSeal | None = None
) -> None:
    """Write the checkpoint beside the old one, then swap: a kill at any point leaves one complete checkpoint.

    `weights`: the LoRA weights under PEFT's names (`lora_state`), so that a
    run trained alone or in a batch of users resumes from the other's checkpoint.
    `seal`: encryption at rest, every file sealed for the job's user."""
    from safetensors.torch import save

    staging, previous = siblings(checkpoint_dir)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _write(staging / "adapter.safetensors", save({k: v.detach().cpu().contiguous() for k, v in weights.items()}), seal)
    optim_tensors, optim_meta = {}, {"param_groups": optimizer.state_dict()["param_groups"], "state_keys": {}}
    for pid, state in optimizer.state_dict()["state"].items():
        optim_meta["state_keys"][str(pid)] = {}
        for name, value in state.items():
            if hasattr(value, "detach"):
                optim_tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                optim_meta["state_keys"][str(pid)][name] = value
    _write(staging / "optimizer.safetensors", save(optim_tensors), seal)
    _write(staging / PROGRESS, progress.model_copy(update={"optim": optim_meta}).model_dump_json().encode(), seal)
    if checkpoint_dir.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(checkpoint_dir, previous)
    os.replace(staging, checkpoint_dir)
    shutil.rmtree(previous, ignore_errors=True)


def resumable_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The complete checkpoint to resume from, if any (the previous one when a kill fell inside the swap)."""
    for candidate in (checkpoint_dir, siblings(checkpoint_dir)[1]):
        if (candidate / PROGRESS).is_file():
            return candidate
    return None


def usable_checkpoint(checkpoint_dir: Path | None, expected: dict, seal: UserSeal | None = None) -> Path | None:
    """The complete checkpoint to resume from (`resumable_checkpoint`) if its LoRA weights fit a run whose weights are
    `expected` (names and shapes).

    One written with another LoRA shape (the settings' rank, target modules or
    layers changed between a kill and the restart) cannot continue this run:
    it is removed with a warning and the run starts over, instead of failing
    on every restart."""
    checkpoint = resumable_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpoint is None:
        return None
    from safetensors.torch import load

    if same_lora_shape(load(_read(checkpoint / "adapter.safetensors", seal)), expected):
        return checkpoint
    log.warning(
        "%s was written with another LoRA shape than this run's (rank, target modules or layers changed since): "
        "removed, starting over",
        checkpoint,
    )
    remove_checkpoint(checkpoint_dir)
    return None


def load_checkpoint(optimizer, checkpoint_dir: Path, seal: UserSeal | None = None) -> tuple[Progress, dict[str, Any]]:
    """Restore the optimizer's state (safetensors only, never pickle); return the progress record and the LoRA weights."""
    from safetensors.torch import load

    progress = Progress.model_validate_json(_read(checkpoint_dir / PROGRESS, seal))
    weights = load(_read(checkpoint_dir / "adapter.safetensors", seal))
    tensors = load(_read(checkpoint_dir / "optimizer.safetensors", seal))
    state: dict = {int(pid): dict(scalars) for pid, scalars in progress.optim["state_keys"].items()}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": _with_own_kernels(progress.optim["param_groups"], optimizer)})
    return progress, weights


# How an optimizer runs its update, not what it computes: the resuming optimizer's own choice stands (a
# checkpoint written where the fused kernel ran resumes where it does not, and the other way round).
_KERNEL_CHOICES = ("foreach", "fused", "capturable", "differentiable")


def _with_own_kernels(saved_groups: list[dict], optimizer) -> list[dict]:
    """The saved hyperparameters of each parameter group with `optimizer`'s own kernel choices."""
    if len(saved_groups) != len(optimizer.param_groups):
        return saved_groups  # not this optimizer's checkpoint: torch's load_state_dict says so
    return [
        {**saved, **{k: group[k] for k in _KERNEL_CHOICES if k in group}}
        for saved, group in zip(saved_groups, optimizer.param_groups)
    ]


def remove_checkpoint(checkpoint_dir: Path) -> None:
    """Drop a job's checkpoint once its version is registered."""
    for path in (checkpoint_dir, *siblings(checkpoint_dir)):
        shutil.rmtree(path, ignore_errors=True)
