"""Trainer benchmark: adaptloop's loop against transformers `Trainer` + PEFT.

    .venv/bin/python benchmarks/trainer_throughput.py [--examples 96] [--epochs 2]
    (or: make bench-trainer)

Same base model (the embedded SmolLM2-135M-Instruct), same tokenized data
(chat template, loss on answers only, per-example weights 1), same LoRA
(r=16, alpha=32, all linear layers), same optimizer settings, batch size and
epochs, in the same run. Each side runs in its own process so peak memory
(max RSS, and CUDA peak where there is a GPU) is its own. Reports training
tokens/s (non-padding tokens), peak memory and the final loss (the mean loss over the
whole training set after training), which must agree within a few percent
for the comparison to count.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.host import machine

REPO = Path(__file__).resolve().parents[1]


def make_examples(n: int, seed: int = 0):
    from schemas.training import TrainingExample

    rng = random.Random(seed)
    subjects = ["my dog", "my flat", "my sister", "my car", "my team", "my project", "my bank", "my doctor"]
    out = []
    for i in range(n):
        subject = subjects[i % len(subjects)]
        detail = " ".join(
            rng.choice(["blue", "quiet", "north", "old", "bright", "small", "warm", "fast"]) for _ in range(rng.randint(2, 30))
        )
        out.append(TrainingExample(prompt=f"Tell me about {subject}, item {i}?", response=f"Item {i}: {subject} is {detail}."))
    return out


def run_side(side: str, examples: int, epochs: int, batch: int) -> dict:
    import torch

    from trainer.data import tokenize
    from trainer.loss import weighted_loss
    from trainer.model import EMBEDDED_SMOLLM, load_base, resolve_base_model
    from trainer.train import TrainConfig, train_adapter

    torch.manual_seed(0)
    base = resolve_base_model(EMBEDDED_SMOLLM, None, Path.home() / ".cache" / "adaptloop")
    model, tokenizer, device = load_base(base, "auto")
    data = make_examples(examples)
    cfg = TrainConfig.from_settings(epochs=epochs, batch_size=batch, learning_rate=1e-3, checkpoint_every=0, warmup_steps=2)
    items = tokenize(tokenizer, data, cfg.max_seq_len)
    real_tokens = sum(len(t.input_ids) for t in items) * epochs

    def training_set_loss(trained) -> float:
        """Mean loss over the whole training set after training: comparable across batch orders."""
        from trainer.data import collate

        trained.eval()
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(items), batch):
                chunk = items[start : start + batch]
                ids, mask, labels, weights = collate(chunk, tokenizer.pad_token_id, device)
                total += weighted_loss(trained(input_ids=ids, attention_mask=mask).logits, labels, weights).item() * len(chunk)
        return total / len(items)

    if side == "adaptloop":
        import tempfile

        from peft import PeftModel

        with tempfile.TemporaryDirectory() as tmp:
            result = train_adapter(model, tokenizer, device, data, cfg, Path(tmp) / "a")
            final = training_set_loss(PeftModel.from_pretrained(model, str(result.adapter_dir)))
        seconds = result.seconds
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        lora = LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules),
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, lora)
        rows = [{"input_ids": t.input_ids, "attention_mask": [1] * len(t.input_ids), "labels": t.labels} for t in items]

        class Recording(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
                labels = inputs.pop("labels")
                outputs = model(**inputs)
                loss = weighted_loss(outputs.logits, labels, torch.ones(labels.shape[0], device=labels.device))
                return (loss, outputs) if return_outputs else loss

        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(
                output_dir=tmp,
                per_device_train_batch_size=batch,
                num_train_epochs=epochs,
                learning_rate=1e-3,
                lr_scheduler_type="polynomial",
                lr_scheduler_kwargs={"power": 0.5, "lr_end": 0.0},
                warmup_steps=2,
                max_grad_norm=1.0,
                weight_decay=0.0,
                logging_steps=1000,
                save_strategy="no",
                report_to=[],
                seed=0,
                dataloader_num_workers=0,
                disable_tqdm=True,
                use_cpu=device == "cpu",
                bf16=device == "cuda" and torch.cuda.is_bf16_supported(),
            )
            trainer = Recording(
                model=peft_model,
                args=args,
                train_dataset=rows,
                data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
            )
            started = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - started
        final = training_set_loss(peft_model)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {
        "side": side,
        "seconds": round(seconds, 2),
        "tokens": real_tokens,
        "tokens_per_s": round(real_tokens / seconds, 1),
        "final_loss": round(final, 4),
        "peak_rss_mb": round(peak_rss_mb),
        "cuda_peak_mb": cuda_peak,
        "device": device,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--side", choices=["adaptloop", "hf-trainer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.examples, args.epochs, args.batch)))
        return
    results = {}
    for side in ("hf-trainer", "adaptloop"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--side",
                side,
                "--examples",
                str(args.examples),
                "--epochs",
                str(args.epochs),
                "--batch",
                str(args.batch),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        if out.returncode != 0:
            raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    ours, base = results["adaptloop"], results["hf-trainer"]
    summary = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{machine()}, Python {platform.python_version()}, device {ours['device']}",
        "examples": args.examples,
        "epochs": args.epochs,
        "batch": args.batch,
        "results": results,
        "speedup_tokens_per_s": round(ours["tokens_per_s"] / base["tokens_per_s"], 2),
        "final_loss_diff_pct": round(100 * abs(ours["final_loss"] - base["final_loss"]) / base["final_loss"], 1),
    }
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"trainer-{summary['date'][:10]}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print("\n| run | tokens/s | peak RSS MB | final loss |\n| --- | ---: | ---: | ---: |")
    for side in ("hf-trainer", "adaptloop"):
        r = results[side]
        print(f"| {side} | {r['tokens_per_s']:,.0f} | {r['peak_rss_mb']:,} | {r['final_loss']} |")
    print(f"\nspeed-up {summary['speedup_tokens_per_s']}x, final loss differs by {summary['final_loss_diff_pct']}%")


if __name__ == "__main__":
    main()
