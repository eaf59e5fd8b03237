"""LoRA dropout benchmark: one training step on the default model with torch's dropout, trainer/dropout.py's, and none.

    .venv/bin/python benchmarks/lora_dropout.py [--rows 32 --tokens 40 --rounds 4]

The shipped LoRA (settings' rank, alpha, dropout, target modules and
layers) on the settings' base model; a step is a forward and a backward
pass over `--rows` rows of `--tokens` random tokens. The three kinds take
turns, `--rounds` times, each timed over 3 steps after one untimed step;
the medians and their ratios to torch's are printed and written to
benchmarks/results/lora-dropout-<date>.json. Record them in
benchmarks/README.md with the machine and the date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.host import machine  # noqa: E402
from core.settings import load_settings  # noqa: E402

KINDS = ("torch", "sparse", "none")


def main() -> None:
    args, (peft_model, base, device, ids) = step_setup(__doc__)
    lora = load_settings().lora
    seconds = {kind: [] for kind in KINDS}
    for _ in range(args.rounds):
        for kind in KINDS:
            use_dropout(peft_model, kind, lora.dropout)
            seconds[kind].append(step_seconds(peft_model, ids))
    medians = {kind: statistics.median(s) for kind, s in seconds.items()}
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{machine()}, {device}",
        "base_model": base.model_id,
        "rows": args.rows,
        "tokens": args.tokens,
        "dropout": lora.dropout,
        "step_seconds": {kind: [round(s, 3) for s in runs] for kind, runs in seconds.items()},
        "median_step_seconds": {kind: round(m, 3) for kind, m in medians.items()},
        "vs_torch": {kind: round(m / medians["torch"], 3) for kind, m in medians.items()},
    }
    out = REPO / "benchmarks" / "results" / f"lora-dropout-{result['date'][:10]}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| LoRA dropout | median s per step | vs torch's |")
    print("| --- | ---: | ---: |")
    for kind in KINDS:
        print(f"| {kind} | {medians[kind]:.3f} | {result['vs_torch'][kind]:.2f} |")


def step_setup(doc: str):
    """(args, (peft_model, base, device, ids)): `--rows/--tokens/--rounds` and the settings' base model with the
    shipped LoRA, and the step's random token ids (benchmarks/base_matmuls.py times the same step)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    import torch

    from trainer.lora import add_lora

    settings, base, model, device = settings_base_model()
    lora = settings.lora
    peft_model = add_lora(model, lora.r, lora.alpha, lora.dropout, tuple(lora.target_modules), lora.top_layer_share)
    torch.manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (args.rows, args.tokens), device=device)
    return args, (peft_model, base, device, ids)


def settings_base_model():
    """(settings, base, model, device): the settings and their base model, loaded as the trainer loads it."""
    from trainer.model import load_base, resolve_base_model

    settings = load_settings()
    base = resolve_base_model(settings.model.base_model, settings.model.gguf_file, settings.cache_dir)
    model, _tokenizer, device = load_base(base, settings.model.dtype)
    return settings, base, model, device


def use_dropout(peft_model, kind: str, p: float) -> None:
    """Every LoRA module's dropout made `kind`: torch's `Dropout`, `SparseDropout`, or none."""
    import torch

    from trainer.dropout import SparseDropout, replace_lora_dropout

    make = {"torch": lambda: torch.nn.Dropout(p), "sparse": lambda: SparseDropout(p), "none": torch.nn.Identity}[kind]
    replace_lora_dropout(peft_model, lambda _old: make())
    peft_model.train()


def step_seconds(peft_model, ids, steps: int = 3) -> float:
    """Mean seconds of a forward and backward pass, after one untimed step."""
    params = [p for p in peft_model.parameters() if p.requires_grad]

    def step() -> None:
        peft_model(input_ids=ids, labels=ids).loss.backward()
        for p in params:
            p.grad = None

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


if __name__ == "__main__":
    main()
