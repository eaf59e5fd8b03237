"""GPU projection: what a user-version would cost on one GPU, priced from this machine's counts (when none is lent).

    .venv/bin/python benchmarks/gpu_projection.py                  # 8 users x 5 facts, K = 1 and K = 8
    .venv/bin/python benchmarks/gpu_projection.py --users 4 --batch 4

The default model (135M parameters) is far too small to keep a GPU's
arithmetic busy: there a step costs the host's work of launching it (Python,
PyTorch's dispatcher, the kernel launches), not its multiplications. So this
runs the real loop here (`benchmarks/scale.py`'s rounds: training, checks,
shrink, gate) and counts what a GPU cannot make faster, then prices it:

- layer calls: every decoder-layer call, with gradients (a training step's
  forward, which a backward follows) and without (generation, likelihoods,
  the anchors' base states), and the tokens through them;
- host cost per call: the same layer calls on a model of the default's
  structure 8 wide (its arithmetic is nil), timed here: a GPU's host does at
  least this work per call while its kernels run;
- arithmetic: 2 FLOPs per decoder matrix parameter and token forward, 3x that
  with the backward (to the activations and LoRA), at an assumed 40% of an
  H200's 989 TFLOP/s (dense bf16, the datasheet's);
- the rest (the scoring model, the output head, saving, the registry, Python
  between calls): this machine's wall time outside the layer calls and the
  backward passes, as measured here (an upper bound: a GPU runs the head and
  the scoring model faster too).

GPU seconds per user-version = calls x host cost + arithmetic + rest: a
projection, not a measurement (`make bench-gpu` measures when a GPU is lent).
Results go to stdout and --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gpu import PEAK_BF16_FLOPS, matrix_params  # noqa: E402
from benchmarks.host import machine  # noqa: E402
from benchmarks.learning import loaded_context  # noqa: E402
from benchmarks.scale import run_round, user_jobs  # noqa: E402

ASSUMED_MFU = 0.40  # of PEAK_BF16_FLOPS (H100/H200 SXM, dense bf16)


class LayerCalls:
    """Decoder-layer calls counted and timed by kind (with or without gradients), and backward passes timed."""

    def __init__(self) -> None:
        self.calls = {"train": 0, "infer": 0}
        self.tokens = {"train": 0, "infer": 0}
        self.seconds = 0.0  # inside layer calls and backward passes

    @contextmanager
    def watching(self, layers):
        import torch

        started: list[float] = []

        def before(_module, args, kwargs):
            started.append(time.perf_counter())

        def after(_module, args, kwargs, _output):
            self.seconds += time.perf_counter() - started.pop()
            kind = "train" if torch.is_grad_enabled() else "infer"
            hidden = args[0] if args else kwargs["hidden_states"]
            self.calls[kind] += 1
            self.tokens[kind] += hidden.shape[0] * hidden.shape[1]

        handles = [layer.register_forward_pre_hook(before, with_kwargs=True) for layer in layers]
        handles += [layer.register_forward_hook(after, with_kwargs=True) for layer in layers]
        backward = torch.Tensor.backward

        def timed_backward(tensor, *args, **kwargs):
            began = time.perf_counter()
            try:
                return backward(tensor, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - began

        torch.Tensor.backward = timed_backward  # type: ignore[method-assign]
        try:
            yield self
        finally:
            torch.Tensor.backward = backward  # type: ignore[method-assign]
            for handle in handles:
                handle.remove()


def host_cost_per_call(model, rows: int = 8, tokens: int = 40) -> dict[str, float]:
    """Seconds of host work per decoder-layer call, each kind, on a model of `model`'s structure 8 wide."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.lora import add_lora
    from trainer.train import TrainConfig

    config = model.config.to_dict()
    config.update(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=4, vocab_size=64)
    narrow = AutoModelForCausalLM.from_config(type(model.config).from_dict(config)).float()
    cfg = TrainConfig.from_settings()
    # LoRA on every layer: a training step's layer call is an adapted layer's forward and backward.
    peft_model = add_lora(narrow, min(cfg.r, 4), cfg.alpha, cfg.dropout, cfg.target_modules, top_layer_share=1.0)
    layers = config["num_hidden_layers"]
    ids = torch.randint(0, 64, (rows, tokens))
    repeats = 20

    def timed(step) -> float:
        step()
        began = time.perf_counter()
        for _ in range(repeats):
            step()
        return (time.perf_counter() - began) / repeats

    def train_step() -> None:
        peft_model(input_ids=ids).logits.sum().backward()

    with torch.no_grad():
        cache = peft_model(input_ids=ids, use_cache=True).past_key_values

    def decode_step() -> None:  # one token per row after the prompt (the cache grows by one each time: no matter)
        with torch.no_grad():
            peft_model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)

    return {"train": timed(train_step) / layers, "infer": timed(decode_step) / layers}


def projected(round_: dict, watched: LayerCalls, host: dict[str, float], flops: float) -> dict:
    """The round's GPU price per user-version: host-bound layer calls, arithmetic at the assumed MFU, and the rest."""
    versions = round_["users"] - len(round_["failed"])
    if versions < 1:
        raise ValueError(f"every user of the K = {round_['batch_users']} round failed: no user-version to price")
    host_seconds = sum(watched.calls[k] * host[k] for k in host)
    arithmetic = (watched.tokens["train"] * 3 + watched.tokens["infer"]) * flops / (PEAK_BF16_FLOPS * ASSUMED_MFU)
    rest = round_["wall_seconds"] - watched.seconds
    per_version = (host_seconds + arithmetic + rest) / versions
    return {
        "batch_users": round_["batch_users"],
        "cpu_seconds_per_user_version": round_["trainer_seconds_per_user_version"],
        "layer_calls_per_user_version": {k: round(v / versions) for k, v in watched.calls.items()},
        "layer_tokens_per_user_version": {k: round(v / versions) for k, v in watched.tokens.items()},
        "gpu_host_seconds_per_user_version": round(host_seconds / versions, 2),
        "gpu_arithmetic_seconds_per_user_version": round(arithmetic / versions, 3),
        "rest_seconds_per_user_version": round(rest / versions, 2),
        "projected_gpu_seconds_per_user_version": round(per_version, 2),
        "projected_user_versions_per_hour": round(3600 / per_version),
        "promoted": round_["promoted"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--facts", type=int, default=5, help="facts per user")
    parser.add_argument("--batch", type=int, default=8, help="K, compared with K = 1")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / f"gpu-projection-{datetime.now(UTC):%Y-%m-%d}.json"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    say = lambda text: print(text, flush=True)  # noqa: E731
    ctx = loaded_context()
    model = ctx["model"]
    host = host_cost_per_call(model)
    say(f"host cost per layer call: training {host['train'] * 1e3:.2f} ms, inference {host['infer'] * 1e3:.2f} ms")
    jobs = user_jobs(ctx, args.users, args.facts)
    rows = []
    for k in (1, args.batch):
        with LayerCalls().watching(model.model.layers) as watched:
            round_ = run_round(ctx, jobs, k, say)
        rows.append(projected(round_, watched, host, 2.0 * matrix_params(model)))
        say(json.dumps(rows[-1]))
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "base_model": ctx["base"].model_id,
        "users": args.users,
        "facts_per_user": args.facts,
        "assumed_mfu": ASSUMED_MFU,
        "peak_flops": PEAK_BF16_FLOPS,
        "host_seconds_per_layer_call": host,
        "rounds": rows,
    }
    args.out.write_text(json.dumps(report, indent=2))
    say(f"-> {args.out}")


if __name__ == "__main__":
    main()
