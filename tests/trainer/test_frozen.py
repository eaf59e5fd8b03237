"""The frozen layers below the adapters: computed once per distinct row, the same loss and gradients as a full pass."""

from __future__ import annotations

import pytest
import torch

from schemas.training import TrainingExample
from trainer.data import collate, tokenize
from trainer.frozen import first_adapted_layer, frozen_below
from trainer.loss import RowUsers, answer_losses
from trainer.model import BaseModelRef, load_base

pytestmark = pytest.mark.unit

ROWS = [
    TrainingExample(prompt="What is code 1?", response="Code 1 is 7."),
    TrainingExample(prompt="What is code 12345?", response="Yes."),
    TrainingExample(prompt="A much longer question about something else entirely?", response="No, it is not."),
]


@pytest.fixture
def tiny(tiny_model_dir):
    return load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")


@pytest.fixture
def top_lora(tiny):
    """The tiny model (2 layers) with a trained-looking LoRA on its top layer only."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer, device = tiny
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"], layers_to_transform=[1]
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # a trained adapter: the prefix's keys and values depend on it
    yield peft_model, tokenizer, device
    peft_model.unload()


def _loss_and_grads(peft_model, batch, below=None, rows=None):
    params = [p for p in peft_model.parameters() if p.requires_grad]
    loss, per_row = answer_losses(peft_model, *batch, rows=rows, below=below)
    return loss, per_row, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("rows", [ROWS, ROWS[:2], ROWS[2:]], ids=["mixed", "shared-prefix", "one-row"])
def test_starting_above_the_frozen_layers_gives_the_full_passs_loss_and_gradients(top_lora, rows):
    peft_model, tokenizer, device = top_lora
    ids, mask, labels, _ = collate(tokenize(tokenizer, rows, 256), tokenizer.pad_token_id, device)
    batch = (ids, mask, labels, torch.linspace(0.5, 2.0, len(rows)))
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    below = frozen_below(peft_model.get_base_model().model, first_adapted_layer(names))
    assert below is not None and below.first == 1
    full, full_rows, full_grads = _loss_and_grads(peft_model, batch)
    for _ in range(2):  # computing the frozen layers' outputs, then reusing them
        fast, fast_rows, fast_grads = _loss_and_grads(peft_model, batch, below)
        assert torch.allclose(full, fast, atol=1e-5)
        assert torch.allclose(full_rows, fast_rows, atol=1e-5)
        for a, b in zip(full_grads, fast_grads):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in fast_grads)


def test_a_rows_frozen_layers_run_once_whatever_batch_it_is_in(top_lora):
    peft_model, tokenizer, device = top_lora
    items = tokenize(tokenizer, ROWS, 256)
    below = frozen_below(peft_model.get_base_model().model, 1)
    seen: list[int] = []
    lowest = peft_model.get_base_model().model.layers[0]
    handle = lowest.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[0]))
    try:
        for batch in (items[:2], items, items[1:], items[::-1]):
            ids, mask, labels, weights = collate(batch, tokenizer.pad_token_id, device)
            answer_losses(peft_model, ids, mask, labels, weights, below=below)
    finally:
        handle.remove()
    assert seen == [2, 1]  # the first two rows, then the third: never a row again


def test_several_users_rows_above_the_frozen_layers_are_each_their_own_users(tiny):
    """With trainer/multi.py's per-row adapters (RowUsers), starting above the frozen layers changes nothing."""
    from trainer.multi import UserLoras, _initial_lora
    from trainer.train import TrainConfig

    model, tokenizer, device = tiny
    cfg = TrainConfig.from_settings(r=4, alpha=8, dropout=0.0, top_layer_share=0.5)
    initial, _ = _initial_lora(model, cfg)
    loras = UserLoras(model, initial, 2.0, 0.0)
    try:
        for seed in (1, 2):
            torch.manual_seed(seed)
            loras.add({k: torch.randn_like(v) * 0.05 for k, v in initial.items()})
        ids, mask, labels, weights = collate(tokenize(tokenizer, ROWS + ROWS[:2], 256), tokenizer.pad_token_id, device)
        rows = RowUsers((0, 0, 0, 1, 1), loras.through)
        below = frozen_below(model.model, first_adapted_layer(loras.modules))
        assert below is not None
        _, full = answer_losses(model, ids, mask, labels, weights, rows=rows)
        _, fast = answer_losses(model, ids, mask, labels, weights, rows=rows, below=below)
        assert torch.allclose(full, fast, atol=1e-5)
        assert not torch.allclose(full[:2], full[3:], atol=1e-3)  # the two users' adapters answer differently
    finally:
        loras.remove()


def test_it_applies_only_where_the_lower_layers_are_frozen_and_plain(tiny):
    model, _, _ = tiny
    assert (
        first_adapted_layer(["base_model.model.model.layers.3.mlp.up_proj.lora_A.weight", "model.layers.1.self_attn.q_proj"]) == 1
    )
    assert first_adapted_layer(["model.layers.1.self_attn.q_proj", "lm_head"]) == 0  # something below every layer adapted
    assert first_adapted_layer([]) == 0
    assert frozen_below(model.model, 0) is None  # nothing below the adapters
    config = model.model.config
    config.attention_dropout = 0.1
    try:
        assert frozen_below(model.model, 1) is None  # random below the adapters: not a function of the tokens
    finally:
        config.attention_dropout = 0.0
    assert frozen_below(model.model, 1) is not None


def test_left_padded_rows_are_a_clear_error(tiny):
    from core.errors import ModelError

    model, _, _ = tiny
    below = frozen_below(model.model, 1)
    assert below is not None
    ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    with pytest.raises(ModelError, match="right-padded"):
        below.inputs(ids, torch.tensor([[1, 1, 1], [0, 1, 1]]))
    assert below.inputs(ids, torch.tensor([[1, 1, 1], [1, 1, 0]])).shape == (2, 3, model.config.hidden_size)
