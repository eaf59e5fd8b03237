"""LoRA on the kept base model: which layers, a warm start from an earlier adapter, shrinking the update."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from core.errors import ModelError
from schemas.manifest import ADAPTER_WEIGHTS


@contextmanager
def adapter_applied(model, adapter_dir: Path | None) -> Iterator:
    """The kept base model with a saved PEFT adapter on it, in eval mode (None: the base model itself); unloaded after,
    so the kept base model is as it was."""
    if adapter_dir is None:
        yield model
        return
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(model, str(adapter_dir))
    try:
        adapted.eval()
        yield adapted
    finally:
        adapted.unload()


def add_lora(model, r: int, alpha: int, dropout: float, target_modules: tuple[str, ...], top_layer_share: float):
    """The model wrapped with fresh LoRA weights on the top `top_layer_share` of its decoder layers.

    Below the adapted layers nothing trains, so the backward pass stops there.
    LoRA dropout draws its mask as trainer/dropout.py does (a third of the
    time on a CPU). `peft_model.unload()` gives the base model back as it was.
    """
    from peft import LoraConfig, get_peft_model

    from trainer.dropout import use_sparse_dropout

    layers = model.config.num_hidden_layers
    adapted = max(1, round(top_layer_share * layers))
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        layers_to_transform=list(range(layers - adapted, layers)) if adapted < layers else None,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    use_sparse_dropout(peft_model)
    return peft_model


def lora_state(peft_model) -> dict:
    """The model's LoRA weights under PEFT's names (`base_model.model.<module>.lora_A.weight`), in module order."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model)


def same_lora_shape(weights: dict, expected: dict) -> bool:
    """Whether saved LoRA weights fit a run whose weights are `expected`: the same names, each of the same shape."""
    return set(weights) == set(expected) and all(weights[k].shape == v.shape for k, v in expected.items())


def read_fitting_weights(adapter_dir: Path, expected: dict) -> dict:
    """A saved adapter's weights, checked to fit a run whose LoRA weights are `expected` (names and shapes)."""
    from safetensors.torch import load_file

    weights = load_file(Path(adapter_dir) / ADAPTER_WEIGHTS)
    if not same_lora_shape(weights, expected):
        raise ModelError(f"{adapter_dir}: its LoRA weights do not fit this run's LoRA shape (rank or target modules differ)")
    return weights


def load_adapter_weights(peft_model, adapter_dir: Path) -> None:
    """Start from a saved adapter's weights; every LoRA weight of the new model must be in it."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(peft_model, read_fitting_weights(adapter_dir, lora_state(peft_model)))


def write_scaled_update(weights_file: Path, trained: bytes, scale: float) -> None:
    """Write `trained` (an adapter's safetensors bytes) to `weights_file` with its update (the LoRA B matrices, PEFT's
    `lora_B` names) scaled by `scale`: the adapter's change to the base model, `scale` times as large."""
    from safetensors.torch import load, save

    tensors = load(trained)
    scaled = {name: t * scale if ".lora_B." in name else t for name, t in tensors.items()}
    weights_file.write_bytes(save(scaled, metadata={"format": "pt"}))


def shrink_update(model, lora_b: list, scales: list[float], keeps_facts: Callable[[object, float], bool]) -> float:
    """Scale the adapter's update (its LoRA B matrices) by the first of `scales` (smallest first) that `keeps_facts`; return it.

    Early stopping leaves the update just large enough to answer the facts,
    and the drift of general answers grows with its size; a smaller multiple
    often answers them all the same. 1.0 (the update as trained) when no
    smaller one does. `keeps_facts(model, scale)` answers with `model`.
    """
    trained = [p.detach().clone() for p in lora_b]
    for scale in scales:
        for param, weights in zip(lora_b, trained):
            param.copy_(weights * scale)
        if keeps_facts(model, scale):
            return scale
    for param, weights in zip(lora_b, trained):
        param.copy_(weights)
    return 1.0
