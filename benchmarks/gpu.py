"""GPU check: training tokens/s, MFU and user-versions per hour with training.batch_users 1, 8 and 32; QLoRA.

    python benchmarks/gpu.py --out F                # everything below (or: make bench-gpu); needs CUDA
    python benchmarks/gpu.py --parts shape --out F  # one part
    python benchmarks/gpu.py --smoke --out F        # a few seconds' worth of each part, on any device

Parts, in this order unless --parts says otherwise (each one's figures are
written to --out as soon as they are known, so a part that fails or runs out
of time leaves what was measured):

  train   training alone (no gate; two epochs, no early stopping) of K users'
          adapters on the default model's base as the settings load it
          (bfloat16 on a GPU): training tokens/s and MFU at each K.
  qlora   the same on the base in 4 bits (training.quantization: 4bit,
          bitsandbytes NF4, LoRA weights in float32 as PEFT keeps them).
  shape   the same on random weights at a larger instruct model's published
          shape (SmolLM2-1.7B-Instruct's; the default model's tokenizer).
          Throughput only: no PyPI package that ships a larger instruct model
          fits what the device tool carries to a GPU machine (64 MiB a call).
  rounds  the whole loop on the default model, as benchmarks/scale.py runs
          it: K = 1 on the first --alone-users users, then K = 32 and K = 8
          on --users users, each from a fresh registry: user-versions per
          hour, trainer seconds per user-version, gate seconds per candidate,
          training tokens/s and MFU, facts learned, retention, forgetting,
          promoted.

MFU counts LoRA training's model FLOPs: 4 x the decoder's matrix parameters
per trained token (the forward, and the backward to the activations; the
frozen weights get no gradient), against the dense bf16 peak of an H100/H200
SXM (989 TFLOP/s, the datasheet's). Record the output in benchmarks/README.md
with the machine and the date; no test depends on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.host import machine  # noqa: E402

PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM, dense bf16 (NVIDIA's datasheet)

# Published shapes (config.json) of larger instruct models sharing the default model's tokenizer; "tiny" for --smoke.
SHAPES = {
    "smollm2-1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}


def matrix_params(model) -> int:
    """The decoder layers' matrix parameters (the output projection is left out: it runs on answer tokens only)."""
    import torch

    layers = model.get_decoder().layers
    # in x out, not weight.numel(): a 4-bit layer's weight is packed two to a byte.
    return sum(m.in_features * m.out_features for m in layers.modules() if isinstance(m, torch.nn.Linear))


def mfu(tokens_per_s: float | None, params: int, device) -> float | None:
    """Model FLOPs utilisation of LoRA training at `tokens_per_s` (None off CUDA: the peak is a GPU's)."""
    if tokens_per_s is None or getattr(device, "type", str(device)) != "cuda":
        return None
    return round(tokens_per_s * 4 * params / PEAK_BF16_FLOPS, 4)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


# ---- the parts ---------------------------------------------------------------------------- #


def rounds_part(args, say, keep) -> None:
    """The default model's K = 1, 8, 32 rounds (benchmarks/scale.py's rounds), with tokens/s and MFU."""
    from benchmarks.learning import loaded_context
    from benchmarks.scale import run_round, user_jobs

    ctx = loaded_context()
    params = matrix_params(ctx["model"])
    jobs = user_jobs(ctx, max(args.users, args.alone_users), args.facts)
    part = {"base_model": ctx["base"].model_id, "device": str(ctx["device"]), "dtype": str(ctx["model"].dtype)}
    part |= {"matrix_params": params, "rounds": []}
    for k in args.ks:
        r = run_round(ctx, jobs[: args.alone_users] if k == 1 else jobs[: args.users], k, say)
        r["mfu"] = mfu(r["train_tokens_per_s"], params, ctx["device"])
        part["rounds"].append(r)
        part["peak_memory_gib"] = peak_memory_gib()
        one = part["rounds"][0]["user_versions_per_hour"]
        part["speedup_vs_first"] = {x["batch_users"]: round(x["user_versions_per_hour"] / one, 2) for x in part["rounds"]}
        keep(part)  # each round's figures as soon as it is done
        say(_round_line(r))
    del ctx
    free_memory()


def train_part(args, say, keep) -> None:
    """Training alone (no gate) on the default model's base as the settings load it: tokens/s and MFU at each K."""
    from trainer.model import load_base

    settings, base = _settings_and_base()
    model, tokenizer, device = load_base(base, settings.model.dtype)
    _train_throughput(model, tokenizer, device, args, say, keep, {"model": base.model_id, "dtype": str(model.dtype)})


def qlora_part(args, say, keep) -> None:
    """Training alone on the default model's base in 4 bits (training.quantization: 4bit, QLoRA)."""
    from trainer.model import load_base

    settings, base = _settings_and_base()
    model, tokenizer, device = load_base(base, settings.model.dtype, quantization="4bit")
    part = {"model": base.model_id, "quantization": "4bit", "weights_gib": round(model.get_memory_footprint() / 2**30, 3)}
    _train_throughput(model, tokenizer, device, args, say, keep, part)


def shape_part(args, say, keep) -> None:
    """Training alone on random weights at a larger instruct model's shape: tokens/s and MFU at each K."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.model import load_base

    settings, base = _settings_and_base()
    small, tokenizer, device = load_base(base, settings.model.dtype)
    config = small.config.__class__.from_dict({**small.config.to_dict(), **SHAPES[args.shape]})
    dtype = small.dtype  # the settings' model.dtype as load_base resolved it (auto: bfloat16 on a GPU)
    del small
    free_memory()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    _train_throughput(model, tokenizer, device, args, say, keep, {"shape": args.shape, "config": SHAPES[args.shape]})


def _settings_and_base():
    """The settings, and their base model as a loadable reference (the GGUF converted once)."""
    from core.settings import load_settings
    from trainer.model import resolve_base_model

    settings = load_settings()
    return settings, resolve_base_model(settings.model.base_model, settings.model.gguf_file, settings.cache_dir)


def _train_throughput(model, tokenizer, device, args, say, keep, part: dict) -> None:
    """K users' adapters trained together for two epochs (no early stopping, no shrink, no gate), for each K."""
    import torch

    from benchmarks.trainer_throughput import make_examples
    from core.settings import load_settings
    from trainer.train import TrainConfig, train_adapter

    device = torch.device(device)
    cfg = TrainConfig.from_settings(load_settings(), epochs=2, early_stopping=False, shrink_to=(), max_train_seconds=1e9)
    params = matrix_params(model)
    part |= {"device": str(device), "matrix_params": params, "examples_per_user": args.train_examples, "epochs": 2, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:  # untimed: the device's first kernels (CUDA's start, autotuning)
        train_adapter(model, tokenizer, device, make_examples(2), replace(cfg, epochs=1), Path(tmp))
    for k in args.ks:
        for rows in ("auto",) if k == 1 else args.lora_rows:  # K = 1 trains through PEFT's own layers
            seconds, results = _timed_training(model, tokenizer, device, replace(cfg, lora_rows=rows), k, args.train_examples)
            done = [r for r in results if not isinstance(r, Exception)]
            tokens = sum(r.tokens for r in done)
            row = {"batch_users": k, "lora_rows": rows, "seconds": round(seconds, 2), "tokens": tokens}
            row |= {"tokens_per_s": round(tokens / seconds, 1), "mfu": mfu(tokens / seconds, params, device)}
            row["failed"] = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, Exception)]
            row["loss_first_last"] = [round(done[0].loss_curve[0], 4), round(done[0].loss_curve[-1], 4)] if done else None
            part["rows"].append(row)
            part["peak_memory_gib"] = peak_memory_gib()
            keep(part)
            say(
                f"{part.get('shape') or part.get('quantization') or part['dtype']}: K={k} ({rows}): {row['tokens_per_s']} "
                f"tokens/s, MFU {row['mfu']}, {seconds:.1f} s, loss {row['loss_first_last']} {row['failed'] or ''}"
            )
    del model
    free_memory()


def _timed_training(model, tokenizer, device, cfg, k: int, examples: int) -> tuple[float, list]:
    """K users with `examples` synthetic examples each, trained together (one alone at K = 1): seconds, results."""
    from benchmarks.trainer_throughput import make_examples
    from trainer.multi import UserRun, train_adapters
    from trainer.train import train_adapter

    with tempfile.TemporaryDirectory(prefix="adaptloop-gpu-") as out:
        runs = [UserRun(f"user{u}", make_examples(examples, seed=u), Path(out) / f"user{u}") for u in range(k)]
        _synchronize(device)
        started = time.perf_counter()
        if k == 1:
            results = [train_adapter(model, tokenizer, device, runs[0].examples, cfg, runs[0].out_dir)]
        else:
            results = train_adapters(model, tokenizer, device, runs, cfg)
        _synchronize(device)
        return time.perf_counter() - started, results


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _round_line(r: dict) -> str:
    return (
        f"K={r['batch_users']}: {r['user_versions_per_hour']} user-versions/h, {r['trainer_seconds_per_user_version']} s each "
        f"(train {r['train_seconds_per_user']}, gate {r['gate_seconds_per_candidate']}), {r['train_tokens_per_s']} training "
        f"tokens/s, MFU {r.get('mfu')}, facts {r['facts_learned']}, retention {r['retention']}, promoted {r['promoted']}/"
        f"{r['users']}{' FAILED ' + str(r['failed']) if r['failed'] else ''}"
    )


PARTS = {"train": train_part, "qlora": qlora_part, "shape": shape_part, "rounds": rounds_part}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="train,qlora,shape,rounds", help="comma-separated: " + ", ".join(PARTS))
    parser.add_argument("--users", type=int, default=32, help="users of the K > 1 rounds")
    parser.add_argument("--alone-users", type=int, default=8, help="users of the K = 1 round")
    parser.add_argument("--facts", type=int, default=5, help="facts per user")
    parser.add_argument("--ks", default="1,32,8", help="K values, in the order run")
    parser.add_argument("--shape", default="smollm2-1.7b", choices=sorted(SHAPES))
    parser.add_argument("--train-examples", type=int, default=16, help="examples per user in the training-alone parts")
    parser.add_argument(
        "--lora-rows", default="gathered,split", help="how K > 1 users' rows meet their adapters in the training-alone parts"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that every part runs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / f"gpu-{datetime.now(UTC):%Y-%m-%d}.json")
    args = parser.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]
    args.lora_rows = args.lora_rows.split(",")
    if args.smoke:
        args.users, args.alone_users, args.facts, args.ks = 2, 1, 2, [1, 2]
        args.shape, args.train_examples = "tiny", 4
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    say = lambda text: print(text, flush=True)  # noqa: E731

    report: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(), "gpu": gpu_name()}
    for name in args.parts.split(","):
        started = time.perf_counter()

        def keep(part: dict, name=name, started=started) -> None:
            report[name] = part | {"part_seconds": round(time.perf_counter() - started, 1)}
            args.out.write_text(json.dumps(report, indent=2))

        try:
            PARTS[name](args, say, keep)
        except Exception as exc:  # one part's failure leaves the others' figures (and this part's so far)
            logging.exception("part %s failed", name)
            keep(report.get(name, {}) | {"error": f"{type(exc).__name__}: {exc}"})
        free_memory()
        say(f"part {name}: {time.perf_counter() - started:.1f} s")


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
