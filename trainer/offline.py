"""The seed's offline commands, on the same code as the trainer service.

    adaptloop train --user-id alice --data-path alice.jsonl [--epochs 8]
    adaptloop ask --user-id alice "What is my dog's name?" [--version N]
    adaptloop status alice
    adaptloop history alice

`train` holds out one paraphrase of every taught item that has several
(examples sharing an event_id, else the same response) as validation cases,
trains on the rest, scores the held-out cases and registers the adapter as a
candidate version with a manifest (the validation gate decides what becomes
active; until it exists, `--activate` makes the new version active).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from adaptloop.storage import sha256_bytes
from schemas.training import TrainingExample
from streams.dataset import split_holdout
from trainer.data import read_jsonl
from trainer.model import BaseModelRef, load_base, resolve_base_model
from trainer.registry import AdapterRegistry, VersionInfo
from trainer.train import TrainConfig, generate, train_adapter


@dataclass(frozen=True)
class HeldOutResult:
    prompt: str
    expected: str
    answer: str
    correct: bool


def key_terms(expected: str) -> set[str]:
    """The distinctive words of an answer: names and numbers (capitalised past the first word, or with a digit).

    "Your dog is called Biscuit." -> {"biscuit"}; "Your employee number is 48213." -> {"48213"}.
    Without any, every word longer than three letters counts.
    """
    import re

    words = re.findall(r"[^\W_]+", expected)
    keys = {w.casefold() for i, w in enumerate(words) if any(c.isdigit() for c in w) or (i > 0 and w[0].isupper())}
    return keys or {w.casefold() for w in words if len(w) > 3}


def answers_match(answer: str, expected: str) -> bool:
    """True when at least half of the expected answer's key terms appear in the answer."""
    import re

    keys = key_terms(expected)
    said = {w.casefold() for w in re.findall(r"[^\W_]+", answer)}
    return bool(keys) and len(keys & said) * 2 >= len(keys)


def evaluate(model, tokenizer, device, cases: list[TrainingExample]) -> list[HeldOutResult]:
    results = []
    for case in cases:
        answer = generate(model, tokenizer, device, case.prompt)
        results.append(HeldOutResult(case.prompt, case.response, answer, answers_match(answer, case.response)))
    return results


def _progress_bar(total_hint: int = 0):
    from tqdm import tqdm

    bar = tqdm(total=total_hint or None, desc="training", unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(step: int, total: int, loss: float) -> None:
        if bar.total != total:
            bar.total = total
        bar.n = step
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.refresh()

    return bar, update


def train_version(
    *,
    registry: AdapterRegistry,
    base: BaseModelRef,
    model,
    tokenizer,
    device,
    user_id: str,
    examples: list[TrainingExample],
    held_out: list[TrainingExample],
    cfg: TrainConfig,
    work_dir: Path,
    dataset_uri: str,
    dataset_sha256: str,
    trigger: str = "manual",
    request_id: str | None = None,
    lineage: list | None = None,
    checkpoint_dir: Path | None = None,
    show_progress: bool = True,
    should_stop=None,
) -> VersionInfo:
    """Train, score the held-out cases, register a candidate version. Shared by CLI and service."""
    bar, update = _progress_bar() if show_progress else (None, None)
    try:
        result = train_adapter(
            model, tokenizer, device, examples, cfg, work_dir / "adapter", checkpoint_dir, progress=update, should_stop=should_stop
        )
    finally:
        if bar is not None:
            bar.close()
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(model, str(result.adapter_dir))
    try:
        scored = evaluate(adapted, tokenizer, device, held_out)
    finally:
        adapted.unload()
    learned = sum(r.correct for r in scored) / len(scored) if scored else None
    manifest = {
        "base_model": base.model_id,
        "base_model_sha256": base.sha256,
        "dataset": {"uri": dataset_uri, "sha256": dataset_sha256, "train_count": len(examples)},
        "held_out": [{"prompt": r.prompt, "expected": r.expected} for r in scored],
        "lineage": lineage or [],
        "hyperparameters": asdict(cfg),
        "metrics": {
            "train_seconds": round(result.seconds, 2),
            "steps": result.steps,
            "tokens": result.tokens,
            "final_loss": result.loss_curve[-1] if result.loss_curve else None,
            **({"facts_learned": round(learned, 4)} if learned is not None else {}),
        },
        "loss_curve": result.loss_curve,
        "resumed_from_step": result.resumed_from_step,
        "trigger": trigger,
        "request_id": request_id,
        "trained_at": datetime.now(timezone.utc).isoformat(),
        "held_out_results": [asdict(r) for r in scored],
    }
    return registry.register(user_id, result.adapter_dir, manifest)


def train_from_file(
    *,
    registry: AdapterRegistry,
    base_model: str,
    gguf_file: str | None,
    cache_dir: Path,
    dtype: str,
    user_id: str,
    data_path: Path,
    cfg: TrainConfig,
    hold_out: bool = True,
) -> VersionInfo:
    import tempfile

    examples = read_jsonl(data_path)
    train, held_out = split_holdout(examples, cfg.seed) if hold_out else (examples, [])
    base = resolve_base_model(base_model, gguf_file, cache_dir)
    model, tokenizer, device = load_base(base, dtype)
    with tempfile.TemporaryDirectory(prefix="adaptloop-train-") as tmp:
        return train_version(
            registry=registry, base=base, model=model, tokenizer=tokenizer, device=device, user_id=user_id,
            examples=train, held_out=held_out, cfg=cfg, work_dir=Path(tmp),
            dataset_uri=Path(data_path).resolve().as_uri(), dataset_sha256=sha256_bytes(Path(data_path).read_bytes()),
        )  # fmt: skip


def ask(
    *, registry: AdapterRegistry, base_model: str, gguf_file: str | None, cache_dir: Path, dtype: str,
    user_id: str, prompt: str, version: int | None,
) -> tuple[str, int | None]:  # fmt: skip
    """Answer with the base model plus the user's active (or named) adapter; (answer, version)."""
    base = resolve_base_model(base_model, gguf_file, cache_dir)
    model, tokenizer, device = load_base(base, dtype)
    chosen = version if version is not None else registry.active(user_id)
    if chosen is None:
        return generate(model, tokenizer, device, prompt), None
    info = registry.verify(user_id, chosen)  # refuses a tampered adapter before loading it
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(model, str(info.path))
    return generate(adapted, tokenizer, device, prompt), chosen
