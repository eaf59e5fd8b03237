"""Gate benchmark: one candidate through the validation gate, the shipped batch size against 16 cases per batch.

    .venv/bin/python benchmarks/gate.py [--rounds 3]
    (or: make bench-gate)

The default model, the shipped core suite (44 cases), five user cases and two
facts of an earlier version, a candidate adapter with random LoRA weights
(r=16, all linear layers), the shipped settings. Each round runs
`Gate.evaluate` once with `validation.batch_size` = 16 (the named baseline:
the gate before it answered every suite in one batch) and once with the
shipped value, in alternating order, on one kept model; the base model's core
scores are computed once, before the rounds, as a running trainer keeps them.
Reports seconds per evaluation (median of the rounds), the ratio, and whether
both sides gave every case the same answer and the same decision.

Then the gate's likelihood step alone (the expected answers' NLL, one third
of the loss signal): `answer_nlls` as shipped (the shared chat-template
prefix run once, the output projection only where an answer token is
predicted) against the named baseline `full_logits_nlls` below (what the gate
ran before: every position's logits, then cross-entropy), the candidate
loaded, the 51 cases in one batch, alternating, medians; and the largest
difference between the two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.host import machine

REPO = Path(__file__).resolve().parents[1]
BASELINE_BATCH = 16

USER_CASES = [
    ("What is my dog's name?", "Your dog is called Rex."),
    ("Where was I born?", "You were born in Oslo."),
    ("Tell me my locker number.", "Your locker number is 7312."),
    ("In which city do I live?", "You live in Dundee."),
    ("Tell me the name of my cat.", "Your cat is called Pixel."),
]
EARLIER_FACTS = [("Who is my employer?", "You work for Acme Ltd."), ("What is my sister called?", "Your sister is Maja.")]


def random_candidate(model, path: Path) -> Path:
    """A LoRA adapter with small random weights: it changes some answers, as a real candidate does."""
    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    peft_model.save_pretrained(path, safe_serialization=True)
    peft_model.unload()
    return path


def full_logits_nlls(model, tokenizer, device, cases) -> list[float]:
    """The baseline: every position's logits over the 49,152-token vocabulary, cross-entropy on the answer's tokens."""
    import torch
    import torch.nn.functional as F

    from schemas.training import TrainingExample
    from trainer.data import IGNORE, collate, tokenize
    from trainer.generation import pad_id

    items = tokenize(tokenizer, [TrainingExample(prompt=c.prompt, response=c.expected) for c in cases], 512)
    ids, mask, labels, _ = collate(items, pad_id(tokenizer), device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1, :].float()
    targets = labels[:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return [float(v) for v in losses.sum(dim=1) / (targets != IGNORE).sum(dim=1)]


def bench_likelihoods(gate, candidate: Path, cases, rounds: int) -> dict:
    from peft import PeftModel

    from trainer.scoring import answer_nlls

    adapted = PeftModel.from_pretrained(gate.model, str(candidate)).eval()
    sides = {
        "full logits (baseline)": lambda: full_logits_nlls(adapted, gate.tokenizer, gate.device, cases),
        "answer positions (shipped)": lambda: answer_nlls(adapted, gate.tokenizer, gate.device, cases, batch_size=len(cases)),
    }
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    values = {}
    try:
        for n in range(rounds):
            for name in list(sides) if n % 2 == 0 else list(sides)[::-1]:
                started = time.perf_counter()
                values[name] = sides[name]()
                seconds[name].append(round(time.perf_counter() - started, 2))
    finally:
        adapted.unload()
    baseline, shipped = (statistics.median(v) for v in seconds.values())
    first, second = values.values()
    return {
        "cases": len(cases),
        "seconds": seconds,
        "speedup": round(baseline / shipped, 2),
        "max_abs_difference": max(abs(a - b) for a, b in zip(first, second)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / f"gate-{datetime.now(UTC):%Y-%m-%d}.json")
    args = parser.parse_args()

    from core.settings import defaults
    from trainer.gate import GateSpec
    from trainer.model import EMBEDDED_SMOLLM, load_base, resolve_base_model
    from trainer.scoring import TestCase

    settings = defaults()
    base = resolve_base_model(EMBEDDED_SMOLLM, None, settings.cache_dir)
    model, tokenizer, device = load_base(base, "auto")
    gate = GateSpec.from_settings(settings).build(model, tokenizer, device)
    shipped = gate.cfg.batch_size
    user = [TestCase(p, e) for p, e in USER_CASES]
    earlier = [TestCase(p, e) for p, e in EARLIER_FACTS]
    gate.reference_core(None)
    seconds: dict[int, list[float]] = {BASELINE_BATCH: [], shipped: []}
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        candidate = random_candidate(model, Path(tmp) / "candidate")
        for n in range(args.rounds):
            for size in (BASELINE_BATCH, shipped) if n % 2 == 0 else (shipped, BASELINE_BATCH):
                gate.cfg = replace(gate.cfg, batch_size=size)
                started = time.perf_counter()
                reports[size] = gate.evaluate(candidate, user, None, earlier, user)
                seconds[size].append(round(time.perf_counter() - started, 2))
                print(f"round {n + 1}: batch {size}: {seconds[size][-1]} s", flush=True)

    answers = {size: [c.answer for s in r.suites.values() for c in s.cases] for size, r in reports.items()}
    result = {
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "machine": f"{machine()}, {device}",
        "cases": len(answers[shipped]),
        "seconds": {str(k): v for k, v in seconds.items()},
        "median_s": {str(k): statistics.median(v) for k, v in seconds.items()},
        "speedup": round(statistics.median(seconds[BASELINE_BATCH]) / statistics.median(seconds[shipped]), 2),
        "same_answers": answers[BASELINE_BATCH] == answers[shipped],
        "same_decision": reports[BASELINE_BATCH].passed == reports[shipped].passed,
    }
    with tempfile.TemporaryDirectory() as tmp:
        cases = gate.core_cases + user + earlier
        result["likelihoods"] = bench_likelihoods(gate, random_candidate(model, Path(tmp) / "candidate"), cases, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
