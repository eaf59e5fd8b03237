"""The anchor set: general prompts with the base model's own answers, mixed into every training run.

    anchors = load_anchor_answers(model, tokenizer, device, prompts, cache_dir, base_sha256)
    mixed = mix_anchors(user_examples, anchors, AnchorMix(ratio=1.0, minimum=16), seed=0)

A LoRA fine-tune on a handful of personal facts learns them and rewrites
general answers too ("the capital of France is <the user's birthplace>").
Training on the base model's own answers to a few hundred general prompts
(self-distillation) alongside the user's examples keeps those answers where
they were. The answers are generated once per base model and prompt list
(greedy, batched) and cached as JSONL under `<cache_dir>/anchors/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from schemas.training import TrainingExample

log = logging.getLogger("adaptloop.trainer")

ANCHOR_FILE = "anchor_prompts.txt"
_MAX_NEW_TOKENS = 32  # the KL is taken along the base answer: its first sentence or two is enough


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and `#` comments skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _cache_path(cache_dir: Path, base_sha256: str, prompts: list[str]) -> Path:
    key = hashlib.sha256(json.dumps([base_sha256, _MAX_NEW_TOKENS, prompts]).encode()).hexdigest()[:20]
    return Path(cache_dir) / "anchors" / f"{key}.jsonl"


def load_anchor_answers(model, tokenizer, device, prompts: list[str], cache_dir: Path, base_sha256: str) -> list[TrainingExample]:
    """The base model's answers to `prompts`, from the cache or generated once (the model must be the plain base)."""
    path = _cache_path(cache_dir, base_sha256, prompts)
    if base_sha256 and path.is_file():
        return [TrainingExample.model_validate_json(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    from trainer.train import generate_batch

    log.info("answering %d anchor prompts with the base model (once per base model)", len(prompts))
    answers = generate_batch(model, tokenizer, device, prompts, _MAX_NEW_TOKENS, batch_size=32)
    examples = []
    for prompt, answer in zip(prompts, answers):
        try:
            examples.append(TrainingExample(prompt=prompt, response=answer, source="anchor"))
        except ValueError:  # an empty answer, or one with control characters: not worth teaching back
            continue
    if base_sha256:  # an unidentified base model (a hub id) is never cached: its weights could change
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines(e.model_dump_json() + "\n" for e in examples)
        os.replace(tmp, path)
    return examples


@dataclass(frozen=True)
class AnchorMix:
    """How many anchors join a run: ratio x the user's examples, at least `minimum`; their loss weight."""

    ratio: float = 1.0
    minimum: int = 16
    weight: float = 1.0


def _normal(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip("?.! ")


def mix_anchors(examples: list[TrainingExample], anchors: list[TrainingExample], mix: AnchorMix, seed: int) -> list[TrainingExample]:
    """The user's examples plus a seeded sample of anchors (ratio x as many, at least `minimum`).

    Anchors asking what a user example asks are left out: the user's answer wins.
    """
    taught = {_normal(e.prompt) for e in examples}
    usable = [a for a in anchors if _normal(a.prompt) not in taught]
    count = min(len(usable), max(mix.minimum, round(mix.ratio * len(examples))))
    if count <= 0:
        return list(examples)
    chosen = random.Random(seed).sample(usable, count)
    return list(examples) + [a.model_copy(update={"weight": mix.weight, "source": "anchor"}) for a in chosen]
