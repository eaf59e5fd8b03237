"""The loss's row groups: several users' rows above the shared prefix, each group padded to its own longest row."""

from __future__ import annotations

import pytest
import torch

from schemas.training import TrainingExample
from trainer import loss
from trainer.data import collate, tokenize
from trainer.frozen import first_adapted_layer, frozen_below
from trainer.loss import RowUsers, answer_losses, length_groups
from trainer.model import BaseModelRef, load_base

pytestmark = pytest.mark.unit

# Three users' rows, each user's next to each other (as a batched step has them), lengths all over the place.
USERS = (2,) * 6 + (0,) * 6 + (1,) * 6
EXAMPLES = [
    TrainingExample(prompt=f"What is code {i}?" + " Tell me more." * (i * 7 % 5), response="It is" + " seven" * (i % 4) + ".")
    for i in range(len(USERS))
]


def test_groups_hold_rows_of_similar_length_and_each_users_rows_together():
    lengths = [5, 30, 6, 29, 7, 28, 8, 27, 9, 26, 10, 25, 11, 24, 12, 23, 13, 22]
    users = [i // 6 for i in range(len(lengths))]
    groups = length_groups(lengths, users)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths)))  # every row once
    assert len(groups) == 2 and all(len(g) >= 8 for g in groups)
    assert max(lengths[r] for r in groups[0]) < min(lengths[r] for r in groups[1])  # the short rows, then the long
    for group in groups:
        seen = [users[r] for r in group]
        assert seen == sorted(seen)  # one run of rows per user: one LoRA product each
    assert length_groups([5, 30, 6], [0, 1, 0]) == [[0, 2, 1]]  # fewer rows than two groups hold: one group


@pytest.fixture
def three_users(tiny_model_dir):
    """The tiny model with trainer/multi.py's per-row adapters for three users, each its own random weights."""
    from trainer.multi import UserLoras, _initial_lora
    from trainer.train import TrainConfig

    model, tokenizer, device = load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")
    initial, _ = _initial_lora(model, TrainConfig.from_settings(r=4, alpha=8, dropout=0.0, top_layer_share=0.5))
    loras = UserLoras(model, initial, 2.0, 0.0)
    for seed in range(3):
        torch.manual_seed(seed)
        loras.add({k: torch.randn_like(v) * 0.05 for k, v in initial.items()})
    yield model, tokenizer, device, loras
    loras.remove()


@pytest.mark.parametrize("frozen", [False, True], ids=["whole-model", "above-frozen-layers"])
def test_rows_in_length_groups_give_one_widths_losses_and_gradients(three_users, monkeypatch, frozen):
    model, tokenizer, device, loras = three_users
    ids, mask, labels, _ = collate(tokenize(tokenizer, EXAMPLES, 256), tokenizer.pad_token_id, device)
    weights = torch.linspace(0.5, 2.0, len(USERS))
    assert len(length_groups([int(n) for n in mask.sum(dim=1)], USERS)) > 1
    below = frozen_below(model.model, first_adapted_layer(loras.modules)) if frozen else None
    params = [p for user in range(3) for p in loras.params(user)]

    def losses_and_grads():
        total, per_row = answer_losses(model, ids, mask, labels, weights, rows=RowUsers(USERS, loras.through), below=below)
        return per_row, torch.autograd.grad(total, params)

    grouped_rows, grouped_grads = losses_and_grads()
    monkeypatch.setattr(loss, "_GROUP_ROWS", len(USERS) + 1)  # every row in one group: one width for all
    one_width_rows, one_width_grads = losses_and_grads()
    assert torch.allclose(grouped_rows, one_width_rows, atol=1e-5)
    for grouped, one_width in zip(grouped_grads, one_width_grads):
        assert torch.allclose(grouped, one_width, atol=1e-5, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in grouped_grads[:: len(params) // 3])  # every user's weights learn
