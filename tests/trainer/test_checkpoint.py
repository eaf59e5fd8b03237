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
