"""Loading the base model: QLoRA's 4-bit base is refused clearly where it cannot run."""

from __future__ import annotations

import pytest

from core.errors import ModelError
from trainer.model import BaseModelRef, load_base

pytestmark = pytest.mark.unit


def test_4bit_quantization_on_a_cpu_is_a_clear_error_naming_the_setting(tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: 4-bit loading is possible")
    with pytest.raises(ModelError, match=r"training\.quantization: 4bit needs a CUDA GPU"):
        load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32", quantization="4bit")
