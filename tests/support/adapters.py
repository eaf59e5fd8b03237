"""Adapters, manifests and fact datasets for the trainer, API and reliability tests."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.manifest import AdapterManifest

FACTS = [
    ("f1", ["What is my dog's name?", "What's the name of my dog?", "Tell me my dog's name."], "Your dog is called Biscuit."),
    ("f2", ["Where was I born?", "In which town was I born?", "What is my birthplace?"], "You were born in Tromsø."),
    (
        "f3",
        [
            "What is my favourite programming language?",
            "Which programming language do I like best?",
            "What language do I prefer to code in?",
        ],
        "Your favourite language is OCaml.",
    ),
    (
        "f4",
        ["Which football team do I support?", "What team am I a fan of?", "Who do I support in football?"],
        "You support Hibernian FC.",
    ),
    (
        "f5",
        ["What is my employee number?", "What's my staff ID number?", "Tell me my employee number."],
        "Your employee number is 48213.",
    ),
]


def write_facts(path: Path, facts=FACTS) -> Path:
    """A dataset file: every prompt of every fact, the fact's answer, grouped by event_id."""
    with open(path, "w") as fh:
        for event_id, prompts, answer in facts:
            for prompt in prompts:
                fh.write(json.dumps({"prompt": prompt, "response": answer, "source": "correction", "event_id": event_id}) + "\n")
    return path


def fake_adapter(parent: Path, name: str = "a", payload: bytes = b"weights") -> Path:
    """A directory shaped like a PEFT adapter, its weights file just `payload`: for registry and API tests."""
    directory = parent / name
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (directory / "adapter_model.safetensors").write_bytes(payload)
    return directory


def manifest(**fields) -> AdapterManifest:
    """What a trainer would hand the registry, with only the fields a test cares about."""
    return AdapterManifest.model_validate(fields)


def random_adapter(model, path, seed: int, scale: float = 0.5):
    """A LoRA adapter with random weights: it changes the tiny model's answers, deterministically."""
    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(path, safe_serialization=True)
    peft_model.unload()
    return path
