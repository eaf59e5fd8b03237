"""Loading the base model: QLoRA's 4-bit base is refused clearly where it cannot run; the caches key it as loaded."""

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


def test_the_caches_know_a_base_model_held_in_another_precision_apart(tiny_model_dir, tmp_path):
    """The anchors' answers and the gate's core scores of a base model are cached by its weights' sha256 as loaded in
    float32, and apart when it is held otherwise (bfloat16 here; 4-bit on a GPU): its greedy answers differ."""
    import torch

    from core.settings import defaults
    from trainer.job import runner_from_settings
    from trainer.model import cache_identity

    sha = "ab" * 32
    settings = defaults().model_copy(update={"cache_dir": tmp_path})
    caches = {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer, device = load_base(BaseModelRef(str(tiny_model_dir), "tiny", sha), dtype)
        assert model.dtype == getattr(torch, dtype)
        runner = runner_from_settings(settings, BaseModelRef(str(tiny_model_dir), "tiny", sha), model, tokenizer, device)
        caches[dtype] = (runner.anchors.cache_file, runner.gate._base_file)
        assert (cache_identity(sha, model) == sha) == (dtype == "float32"), "float32's caches keep their names"
    assert caches["float32"][0] != caches["bfloat16"][0] and caches["float32"][1] != caches["bfloat16"][1]
    assert all(f.parent == tmp_path / "anchors" for f in (caches["float32"][0], caches["bfloat16"][0]))
    assert cache_identity("", model) == "", "an unidentified base model is never cached"
