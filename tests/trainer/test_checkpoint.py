"""Checkpoints sealed at rest: every file encrypted for the job's user, and a resume reads them back."""

from __future__ import annotations

import pytest

from core.encryption import MAGIC, user_seal
from core.errors import StorageError
from tests.support.stores import sealed_store
from trainer.checkpoint import Progress, load_checkpoint, resumable_checkpoint, save_checkpoint

pytestmark = pytest.mark.unit


def _optimizer():
    import torch

    param = torch.nn.Parameter(torch.ones(2, 2))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(2, 2)
    optimizer.step()
    return param, optimizer


def test_a_sealed_checkpoint_resumes_and_is_never_plain_on_disk(tmp_path):
    import torch

    seal = user_seal(sealed_store(tmp_path).sealer, "ana")
    param, optimizer = _optimizer()
    weights = {"base_model.model.lora_A.weight": torch.arange(4.0).reshape(2, 2)}
    save_checkpoint(weights, optimizer, Progress(step=3, loss_curve=[1.0, 0.5]), tmp_path / "ck", seal)
    files = sorted((tmp_path / "ck").iterdir())
    assert [f.name for f in files] == ["adapter.safetensors", "optimizer.safetensors", "progress.json"]
    assert all(f.read_bytes().startswith(MAGIC) for f in files)

    resumed = torch.optim.AdamW([param], lr=0.1)
    progress, loaded = load_checkpoint(resumed, resumable_checkpoint(tmp_path / "ck"), seal)
    assert progress.step == 3 and progress.loss_curve == [1.0, 0.5]
    assert torch.equal(loaded["base_model.model.lora_A.weight"], weights["base_model.model.lora_A.weight"])
    assert torch.equal(resumed.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(StorageError, match="is encrypted"):
        load_checkpoint(torch.optim.AdamW([param]), tmp_path / "ck")


@pytest.mark.parametrize("written_fused, resumed_fused", [(False, True), (True, False)])
def test_a_checkpoint_resumes_with_the_resuming_optimizers_own_kernel(tmp_path, written_fused, resumed_fused):
    """The fused AdamW kernel is the trainer's choice where torch has one: a checkpoint written with or without it
    resumes in either, with the same state, and the resuming optimizer keeps its own kernel."""
    import torch

    param = torch.nn.Parameter(torch.ones(2, 2))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=written_fused or None)
    param.grad = torch.ones(2, 2)
    optimizer.step()
    save_checkpoint({"w": param.detach()}, optimizer, Progress(step=1), tmp_path / "ck")

    resumed = torch.optim.AdamW([param], lr=0.5, fused=resumed_fused or None)
    load_checkpoint(resumed, tmp_path / "ck")
    assert bool(resumed.param_groups[0]["fused"]) is resumed_fused
    assert resumed.param_groups[0]["lr"] == 0.1  # the hyperparameters are the checkpoint's
    assert torch.equal(resumed.state_dict()["state"][0]["exp_avg_sq"], optimizer.state_dict()["state"][0]["exp_avg_sq"])
    param.grad = torch.ones(2, 2)
    resumed.step()  # the resumed kernel runs on the loaded state
    assert float(resumed.state_dict()["state"][0]["step"]) == 2.0


def test_the_trainers_optimizer_is_fused_on_a_cpu():
    import torch

    from trainer.train import TrainConfig, optimizer_and_schedule

    optimizer, *_ = optimizer_and_schedule([torch.nn.Parameter(torch.ones(2))], TrainConfig.from_settings(), total_steps=4)
    assert optimizer.param_groups[0]["fused"] is True
