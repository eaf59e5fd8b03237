"""The GPU projection's counting and pricing (no GPU needed)."""

from __future__ import annotations

import pytest

from benchmarks.gpu import PEAK_BF16_FLOPS
from benchmarks.gpu_projection import ASSUMED_MFU, LayerCalls, projected
from trainer.model import BaseModelRef, load_base

pytestmark = pytest.mark.unit


def test_layer_calls_are_counted_by_kind_with_their_tokens_and_time(tiny_model_dir):
    import torch

    model, _, _ = load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, 100, (3, 7))
    with LayerCalls().watching(model.model.layers) as watched:
        model(input_ids=ids).logits.sum().backward()  # training: a forward with gradients, then its backward
        with torch.no_grad():
            model(input_ids=ids[:, :5])
            model(input_ids=ids[:2, :1])
    assert watched.calls == {"train": layers, "infer": 2 * layers}
    assert watched.tokens == {"train": layers * 21, "infer": layers * (15 + 2)}
    assert watched.seconds > 0
    model(input_ids=ids)  # the hooks are gone once out of the block
    assert watched.calls["train"] == layers and torch.Tensor.backward.__name__ == "backward"


def test_a_user_version_is_priced_as_host_calls_plus_arithmetic_plus_the_rest():
    watched = LayerCalls()
    watched.calls, watched.tokens, watched.seconds = {"train": 100, "infer": 400}, {"train": 10**6, "infer": 2 * 10**6}, 30.0
    round_ = {
        "users": 2,
        "failed": [],
        "batch_users": 2,
        "wall_seconds": 50.0,
        "trainer_seconds_per_user_version": 25.0,
        "promoted": 2,
    }
    row = projected(round_, watched, {"train": 0.004, "infer": 0.001}, flops=10**8)
    arithmetic = (3 * 10**6 + 2 * 10**6) * 10**8 / (PEAK_BF16_FLOPS * ASSUMED_MFU)
    assert row["gpu_host_seconds_per_user_version"] == round((100 * 0.004 + 400 * 0.001) / 2, 2)
    assert row["rest_seconds_per_user_version"] == 10.0  # (50 - 30) s over 2 versions
    assert row["projected_gpu_seconds_per_user_version"] == round((0.8 + arithmetic + 20.0) / 2, 2)
    assert row["layer_calls_per_user_version"] == {"train": 50, "infer": 200}


def test_a_round_where_every_user_failed_is_a_clear_error_not_a_division_by_zero():
    round_ = {"users": 2, "failed": ["u1", "u2"], "batch_users": 8, "wall_seconds": 50.0}
    with pytest.raises(ValueError, match="every user of the K = 8 round failed"):
        projected(round_, LayerCalls(), {"train": 0.004, "infer": 0.001}, flops=10**8)
