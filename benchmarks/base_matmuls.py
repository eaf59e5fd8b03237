"""Base-matmul precision benchmark: one training step with the frozen base's products in float32 and in bfloat16.

    .venv/bin/python benchmarks/base_matmuls.py [--rows 32 --tokens 40 --rounds 4]

The shipped LoRA on the settings' base model, a forward and a backward
pass over `--rows` rows of `--tokens` random tokens (benchmarks/lora_dropout.py's
step, with the settings' LoRA dropout), once with every product as loaded
(float32) and once inside trainer/precision.py's `low_precision` (the frozen
linear layers and the output projection in bfloat16); the two take turns,
`--rounds` times. Also the single products behind it: the default model's
three matrix shapes of a 384-token group, float32 against bfloat16. Prints
the medians and their ratio and writes benchmarks/results/base-matmuls-<date>.json.
bfloat16 pays on a CPU that multiplies it natively (AMX: Intel Sapphire
Rapids and later); elsewhere `training.base_matmuls: auto` keeps float32.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.host import machine  # noqa: E402
from benchmarks.lora_dropout import step_seconds, step_setup  # noqa: E402

SHAPES = ((384, 576, 1536), (384, 1536, 576), (900, 576, 49152))  # an MLP's two products, the output projection


def main() -> None:
    args, (peft_model, base, device, ids) = step_setup(__doc__)
    import torch

    from trainer.precision import FrozenMatmuls, native_bf16_cpu

    peft_model.train()
    matmuls = FrozenMatmuls(peft_model, torch.bfloat16)
    seconds: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for _ in range(args.rounds):
        seconds["float32"].append(step_seconds(peft_model, ids))
        with matmuls.active():
            seconds["bfloat16"].append(step_seconds(peft_model, ids))
    medians = {kind: statistics.median(s) for kind, s in seconds.items()}
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{machine()}, {device}, native bf16: {native_bf16_cpu()}",
        "base_model": base.model_id,
        "rows": args.rows,
        "tokens": args.tokens,
        "step_seconds": {kind: [round(s, 3) for s in runs] for kind, runs in seconds.items()},
        "median_step_seconds": {kind: round(m, 3) for kind, m in medians.items()},
        "bfloat16_vs_float32": round(medians["bfloat16"] / medians["float32"], 3),
        "products_ms": {"x".join(map(str, shape)): product_ms(shape) for shape in SHAPES},
    }
    out = REPO / "benchmarks" / "results" / f"base-matmuls-{result['date'][:10]}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['machine']}; a step of {args.rows} rows x {args.tokens} tokens")
    print("| frozen products | median s per step | vs float32 |")
    print("| --- | ---: | ---: |")
    for kind, median in medians.items():
        print(f"| {kind} | {median:.3f} | {median / medians['float32']:.2f} |")
    for shape, ms in result["products_ms"].items():
        print(f"{shape}: float32 {ms['float32']} ms, bfloat16 {ms['bfloat16']} ms")


def product_ms(shape: tuple[int, int, int], reps: int = 10) -> dict[str, float]:
    """Milliseconds of one (m x k) @ (k x n) product in each precision, after three untimed ones."""
    import torch

    m, k, n = shape
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        for _ in range(3):
            a @ b
        started = time.perf_counter()
        for _ in range(reps):
            a @ b
        out[str(dtype).removeprefix("torch.")] = round((time.perf_counter() - started) / reps * 1e3, 2)
    return out


if __name__ == "__main__":
    main()
