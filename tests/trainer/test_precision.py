"""The frozen base's products in bfloat16 during training steps: close to float32, the model itself untouched."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from core.errors import ConfigError
from schemas.training import TrainingExample
from trainer.data import collate, tokenize
from trainer.loss import answer_losses
from trainer.model import BaseModelRef, load_base
from trainer.precision import FrozenMatmuls, effective, low_precision, resolved
from trainer.train import TrainConfig, train_adapter

pytestmark = pytest.mark.unit

ROWS = [TrainingExample(prompt=f"What is code {n}?", response=f"Code {n} is {n * 7}.") for n in range(4)]


@pytest.fixture
def lora_model(tiny_model_dir):
    """The tiny model with a trained-looking LoRA (PEFT): its base frozen, its adapter trainable."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer, device = load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    yield peft_model, tokenizer, device
    peft_model.unload()


def _loss_and_grads(peft_model, batch):
    params = [p for p in peft_model.parameters() if p.requires_grad]
    loss, _ = answer_losses(peft_model, *batch)
    return loss.detach(), torch.autograd.grad(loss, params)


def test_bfloat16_products_give_a_close_but_not_identical_loss_and_gradients(lora_model):
    peft_model, tokenizer, device = lora_model
    batch = collate(tokenize(tokenizer, ROWS, 256), tokenizer.pad_token_id, device)
    matmuls = FrozenMatmuls(peft_model, torch.bfloat16)
    exact, exact_grads = _loss_and_grads(peft_model, batch)
    with low_precision(matmuls):
        low, low_grads = _loss_and_grads(peft_model, batch)
    assert float(low) != float(exact), "the products did not run in bfloat16"
    assert abs(float(low) - float(exact)) < 2e-2 * float(exact)
    for g_low, g_exact in zip(low_grads, exact_grads):
        assert g_low.dtype == torch.float32  # the adapter learns in float32
        assert torch.nn.functional.cosine_similarity(g_low.flatten(), g_exact.flatten(), dim=0) > 0.98


def test_only_the_frozen_linear_layers_get_copies_and_the_model_is_as_it_was_afterwards(lora_model):
    peft_model, tokenizer, device = lora_model
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    matmuls = FrozenMatmuls(peft_model, torch.bfloat16)
    assert matmuls.copies and all(not m.weight.requires_grad for m in matmuls.copies)
    assert all(w.dtype == torch.bfloat16 for w in matmuls.copies.values())
    lm_head = peft_model.get_base_model().lm_head
    assert lm_head in matmuls.copies  # the output projection is a frozen product too
    ids = torch.tensor([tokenize(tokenizer, ROWS[:1], 256)[0].input_ids])
    with torch.no_grad():
        exact = peft_model(ids).logits
        with matmuls.active():
            assert all("forward" in m.__dict__ for m in matmuls.copies)
            low = peft_model(ids).logits
        again = peft_model(ids).logits
    assert not any("forward" in m.__dict__ for m in matmuls.copies)
    assert low.dtype == torch.float32 and not torch.equal(low, exact)
    assert torch.equal(again, exact)
    after = peft_model.state_dict()
    assert all(torch.equal(v, after[k]) and v.dtype == after[k].dtype for k, v in before.items())


def test_a_module_with_its_own_forward_is_left_alone(lora_model):
    peft_model, _, _ = lora_model
    matmuls = FrozenMatmuls(peft_model, torch.bfloat16)
    module = next(iter(matmuls.copies))
    own = module.forward  # a bound method, kept as another library's hook would keep it
    module.forward = own
    with matmuls.active():
        assert module.forward is own
    assert module.forward is own
    del module.forward


def test_the_setting_resolves_per_device_and_dtype():
    assert resolved("float32", "cpu", torch.float32) == "float32"
    assert resolved("bfloat16", "cpu", torch.float32) == "bfloat16"
    assert resolved("auto", torch.device("cuda"), torch.float32) == "float32"  # a GPU model is loaded in bf16 already
    assert resolved("auto", "cpu", torch.bfloat16) == "float32"
    assert effective("float32", "cpu", torch.bfloat16) == "bfloat16"  # a bfloat16 model multiplies in its own dtype
    with pytest.raises(ConfigError, match="training.base_matmuls"):
        resolved("fp8", "cpu", torch.float32)


def test_float32_or_a_bfloat16_model_gets_no_copies(lora_model):
    peft_model, _, device = lora_model
    assert FrozenMatmuls.for_model(peft_model, device, "float32") is None
    assert FrozenMatmuls.for_model(peft_model, device, "bfloat16") is not None


def test_a_run_in_bfloat16_follows_the_float32_runs_loss_curve(tiny_model_dir, tmp_path):
    model, tokenizer, device = load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")
    cfg = TrainConfig.from_settings(epochs=8, batch_size=2, learning_rate=1e-2, r=8, alpha=16, dropout=0.0)
    losses = {}
    for precision in ("float32", "bfloat16"):
        result = train_adapter(model, tokenizer, device, ROWS, replace(cfg, base_matmuls=precision), tmp_path / precision)
        losses[precision] = result.loss_curve
        assert json.loads((result.adapter_dir / "training.json").read_text())["base_products"] == precision
    assert losses["bfloat16"] != losses["float32"]  # the products did run in bfloat16
    assert losses["bfloat16"][-1] < losses["bfloat16"][0] - 0.5  # it learns, as the float32 run does
    assert all(abs(low - exact) < 0.01 * exact for low, exact in zip(losses["bfloat16"], losses["float32"]))


def test_siblings_that_read_one_input_multiply_once(lora_model):
    """q, k and v (and gate and up) of a layer: one product for the group, each layer its own share of it, the
    same values as its own product; a sibling asked with another input gets its own product."""
    peft_model, _, _ = lora_model
    matmuls = FrozenMatmuls(peft_model, torch.bfloat16)
    layers = peft_model.get_base_model().model.layers
    assert len(matmuls.siblings) == 2 * len(layers)  # PEFT's wrapped q_proj and up_proj are found by their names
    attention = layers[0].self_attn
    q, k, v = attention.q_proj.base_layer, attention.k_proj, attention.v_proj
    x, other = torch.randn(2, 3, q.in_features), torch.randn(2, 3, q.in_features)
    with torch.no_grad(), matmuls.active():
        outputs = [q(x), k(x), v(x)]
        alone = k(other)
    assert len({out.untyped_storage().data_ptr() for out in outputs}) == 1  # one product, three views of it
    for module, out in zip((q, k, v), outputs):
        own = torch.nn.functional.linear(x.bfloat16(), matmuls.copies[module]).float()
        assert out.shape == own.shape and torch.allclose(out, own, atol=1e-6)
    assert torch.allclose(alone, torch.nn.functional.linear(other.bfloat16(), matmuls.copies[k]).float(), atol=1e-6)


def test_siblings_together_give_the_gradients_of_their_own_products(lora_model):
    peft_model, tokenizer, device = lora_model
    batch = collate(tokenize(tokenizer, ROWS, 256), tokenizer.pad_token_id, device)
    together = FrozenMatmuls(peft_model, torch.bfloat16)
    apart = FrozenMatmuls(peft_model, torch.bfloat16)
    apart.siblings = []  # every layer its own product
    with low_precision(together):
        loss, grads = _loss_and_grads(peft_model, batch)
    with low_precision(apart):
        own_loss, own_grads = _loss_and_grads(peft_model, batch)
    assert abs(float(loss) - float(own_loss)) < 1e-3 * float(own_loss)
    for g, own in zip(grads, own_grads):
        assert torch.nn.functional.cosine_similarity(g.flatten(), own.flatten(), dim=0) > 0.999
