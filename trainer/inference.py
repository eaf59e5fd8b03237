"""`adaptloop ask`: one answer from the base model plus a user's adapter (active, or a named version)."""

from __future__ import annotations

from pathlib import Path

from core.settings import Settings
from core.storage import scratch_dir
from trainer.generation import generate
from trainer.model import load_base, resolve_base_model
from trainer.registry import AdapterRegistry


def ask(settings: Settings, user_id: str, prompt: str, version: int | None = None) -> tuple[str, int | None]:
    """(answer, the version that answered; None for the base model). A tampered adapter is refused before it is loaded."""
    registry = AdapterRegistry.from_settings(settings)
    chosen = version if version is not None else registry.active(user_id)
    info = registry.info(user_id, chosen) if chosen is not None else None  # plain_dir checks it before PEFT loads it
    base = resolve_base_model(settings.model.base_model, settings.model.gguf_file, settings.cache_dir)
    model, tokenizer, device = load_base(base, settings.model.dtype)
    if info is None:
        return generate(model, tokenizer, device, prompt), None
    from peft import PeftModel

    with scratch_dir("adaptloop-ask-") as tmp:  # the opened files, when sealed at rest
        adapted = PeftModel.from_pretrained(model, str(registry.plain_dir(info.path, Path(tmp))))
    return generate(adapted, tokenizer, device, prompt), chosen
