"""Head-loss benchmark: the output projection's losses of a training step, plain tensor operations against fused.

    .venv/bin/python benchmarks/head_loss.py [--positions 900 --anchors 660 --rounds 5]

The settings' base model's output projection (49,152 x 576 for the default
model) over `--positions` answer positions of random states, `--anchors` of
them anchors held to the base distribution by the settings' divergence and
`anchor_kl` (the counts of a K = 8 step of the scale benchmark's users), the
others scored by cross-entropy; a forward and a backward pass, inside the
training step's frozen-product precision (`training.base_matmuls`).
`plain_head_losses` and the fused `head_losses` (trainer/head_loss.py) take
turns, `--rounds` times. Prints the medians and their ratio and the largest
difference of their gradients, and writes
benchmarks/results/head-loss-<date>.json.
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
from benchmarks.lora_dropout import settings_base_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=900)
    parser.add_argument("--anchors", type=int, default=660)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import torch

    from trainer.head_loss import head_losses, plain_head_losses
    from trainer.precision import FrozenMatmuls, effective, low_precision

    settings, base, model, device = settings_base_model()
    model.requires_grad_(False)  # frozen, as under the adapters (a projection that trains takes the plain path)
    training = settings.training
    precision = effective(training.base_matmuls, device, next(model.parameters()).dtype)
    matmuls = FrozenMatmuls.for_model(model, device, training.base_matmuls)
    torch.manual_seed(0)
    states = torch.randn(args.positions, model.config.hidden_size, device=device)
    targets = torch.randint(0, model.config.vocab_size, (args.positions,), device=device)
    anchors = torch.zeros(args.positions, dtype=torch.bool, device=device)
    anchors[torch.randperm(args.positions)[: args.anchors]] = True
    base_states = states[anchors] + 0.1 * torch.randn(args.anchors, model.config.hidden_size, device=device)

    def step(losses_of) -> tuple[float, object]:
        hidden = states.clone().requires_grad_()
        started = time.perf_counter()
        with low_precision(matmuls):
            per_position = losses_of(
                model.lm_head, hidden, targets, anchors, base_states, training.anchor_kl, training.anchor_divergence
            )
        per_position.mean().backward()
        return time.perf_counter() - started, hidden.grad

    kinds = {"plain": plain_head_losses, "fused": head_losses}
    grads = {kind: step(losses_of)[1] for kind, losses_of in kinds.items()}  # untimed: warm, and compared
    seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind, losses_of in kinds.items():
            seconds[kind].append(step(losses_of)[0])
    medians = {kind: statistics.median(s) for kind, s in seconds.items()}
    gap = float((grads["plain"] - grads["fused"]).abs().max() / grads["plain"].abs().max())
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{machine()}, {device}, frozen products: {precision}",
        "base_model": base.model_id,
        "positions": args.positions,
        "anchors": args.anchors,
        "seconds": {kind: [round(s, 3) for s in runs] for kind, runs in seconds.items()},
        "median_seconds": {kind: round(m, 3) for kind, m in medians.items()},
        "fused_vs_plain": round(medians["fused"] / medians["plain"], 3),
        "gradient_max_relative_difference": gap,
    }
    out = REPO / "benchmarks" / "results" / f"head-loss-{result['date'][:10]}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['machine']}; {args.positions} positions, {args.anchors} of them anchors")
    print("| output projection's losses | median s, forward + backward | vs plain |")
    print("| --- | ---: | ---: |")
    for kind, median in medians.items():
        print(f"| {kind} | {median:.3f} | {median / medians['plain']:.2f} |")
    print(f"gradients: largest difference {gap:.1e} of the largest gradient")


if __name__ == "__main__":
    main()
