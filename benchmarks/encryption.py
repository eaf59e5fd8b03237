"""Encryption at rest: what sealing costs on adapter load and dataset write, and how long a key rotation takes.

    .venv/bin/python benchmarks/encryption.py [--rounds 40] [--users 1000]
    (or: make bench-encryption)

Baseline: the same storage root layout with encryption off, in the same run.

- Adapter load: an adapter of the default shape until 2026-12-04
  (SmolLM2-135M, r=16, the seven linear layers of the top half of the
  decoder: 9.8 MB of float32 weights; the top third now, 6.5 MB), registered once plain and once sealed. Two loads: what `serve`
  does on a cache miss (the registry's `files`: every sha256 checked, the
  sealed file opened; then `read_adapter` from the bytes), and what `ask`,
  the gate and a warm start do (`plain_dir`, then PEFT's `from_pretrained`
  into the kept default model, then `unload`). Rounds alternate plain and
  sealed; medians.
- Dataset write: `write_dataset` of one user's 200 examples (train, test,
  manifest, the latest split; each an atomic write with fsync), plain store
  against sealed store on the same root (the same files replaced),
  alternating; medians.
- Rotation: `keys rotate` over a root with `--users` users, each with a
  registered sealed adapter (data keys made as the trainer makes them), then
  `keys retire` of the old key, then every adapter loads again.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.host import machine  # noqa: E402

HIDDEN, INTERMEDIATE, KV, LAYERS, RANK = 576, 1536, 192, 30, 16
SHAPES = {  # (in, out) of each LoRA target in SmolLM2-135M
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, KV),
    "self_attn.v_proj": (HIDDEN, KV),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTERMEDIATE),
    "mlp.up_proj": (HIDDEN, INTERMEDIATE),
    "mlp.down_proj": (INTERMEDIATE, HIDDEN),
}


def default_shaped_adapter(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(LAYERS // 2, LAYERS):
        for module, (fan_in, fan_out) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=generator) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, RANK, generator=generator) * 0.01
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": [m.split(".")[1] for m in SHAPES],
        "layers_to_transform": list(range(LAYERS // 2, LAYERS)),
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def serve_load(registry, user: str) -> None:
    """What `serve` does on a cache miss (serving/adapters.py `_read`): every sha256 checked, the weights in memory."""
    from serving.lora import read_adapter

    info = registry.info(user, 1)
    read_adapter(info.path, f"{user}@v1", info.manifest.weights_sha256 or "", "cpu", None, registry.files(info))


def peft_load(registry, user: str, model) -> None:
    """What `ask`, the gate and a warm start do: the version opened for PEFT, loaded into the kept model, unloaded."""
    from peft import PeftModel

    from core.storage import scratch_dir

    with scratch_dir("adaptloop-bench-") as scratch:  # as `ask` does
        adapted = PeftModel.from_pretrained(model, str(registry.plain_dir(registry.info(user, 1).path, Path(scratch))))
    adapted.unload()


def timed_ms(fn) -> list[float]:
    started = time.perf_counter()
    fn()
    return [(time.perf_counter() - started) * 1000]


def bench_load(tmp: Path, sealer, rounds: int, model) -> list[dict]:
    from tests.support.adapters import manifest
    from trainer.registry import AdapterRegistry

    source = default_shaped_adapter(tmp / "adapter")
    plain = AdapterRegistry(tmp / "plain")
    sealed = AdapterRegistry(tmp / "sealed-root", sealer=sealer)
    plain.register("ana", source, manifest())
    sealed.register("ana", source, manifest())
    size = (source / "adapter_model.safetensors").stat().st_size
    runs = []
    loads = {"adapter load, serve (cache miss)": lambda reg: serve_load(reg, "ana")}
    if model is not None:
        loads["adapter load, PEFT into the default model (ask, gate)"] = lambda reg: peft_load(reg, "ana", model)
    for what, load in loads.items():
        load(plain), load(sealed)  # warm the page cache for both
        plain_ms, sealed_ms = [], []
        for n in range(rounds):  # alternating which goes first, so drift on the machine falls on both
            for registry in (plain, sealed) if n % 2 == 0 else (sealed, plain):
                (plain_ms if registry is plain else sealed_ms).extend(timed_ms(lambda r=registry, load=load: load(r)))
        runs.append(_pair(what, plain_ms, sealed_ms, bytes=size))
    return runs


def bench_dataset_write(tmp: Path, sealed_store, rounds: int) -> dict:
    """`write_dataset` into a plain and a sealed store, alternating; the fsyncs of the atomic writes dominate both.

    Both stores share one root, so both replace the same files in the same
    directories: the file system's per-directory costs fall on both alike,
    and the one difference is the sealing."""
    from core.storage import ArtifactStore
    from streams.dataset import write_dataset
    from tests.support.stores import user_example

    plain_store = ArtifactStore(sealed_store.root)
    plain_ms, sealed_ms = [], []
    for n in range(rounds * 5):
        examples = [user_example(n * 1000 + i, "ana") for i in range(200)]

        def write(store, examples=examples) -> None:
            write_dataset(store, "ana", examples[:180], examples[180:], trigger="threshold", lineage_ranges=[])

        for store in (plain_store, sealed_store) if n % 2 == 0 else (sealed_store, plain_store):
            (plain_ms if store is plain_store else sealed_ms).extend(timed_ms(lambda s=store, write=write: write(s)))
    return _pair("dataset write (200 examples)", plain_ms, sealed_ms)


def _pair(what: str, plain_ms: list[float], sealed_ms: list[float], **extra) -> dict:
    plain, sealed = statistics.median(plain_ms), statistics.median(sealed_ms)
    return {
        "what": what,
        "plain_ms": round(plain, 2),
        "sealed_ms": round(sealed, 2),
        "overhead": round(sealed / plain - 1, 4),
        **extra,
    }


def bench_rotation(tmp: Path, users: int) -> dict:
    from core.encryption import Keyring, open_store, retire, rotate
    from core.settings import EncryptionSettings
    from core.storage import ArtifactStore
    from tests.support.adapters import fake_adapter, manifest
    from trainer.registry import AdapterRegistry

    keyring = Keyring.create(tmp / "rotation-keyring.json")
    store = open_store(str(tmp / "many"), EncryptionSettings(enabled=True, keyring=keyring.path))
    registry = AdapterRegistry(tmp / "many", sealer=store.sealer)
    source = fake_adapter(tmp, "small", b"w" * 4096)
    started = time.perf_counter()
    for n in range(users):
        registry.register(f"user-{n}", source, manifest())
    setup_s = time.perf_counter() - started
    old = keyring.current
    plain = ArtifactStore(str(tmp / "many"))
    result = rotate(plain, keyring)
    started = time.perf_counter()
    retire(plain, keyring, old)
    retire_s = time.perf_counter() - started
    fresh = AdapterRegistry(
        tmp / "many", sealer=open_store(str(tmp / "many"), EncryptionSettings(enabled=True, keyring=keyring.path)).sealer
    )
    loads = sum(fresh.files(fresh.verify(f"user-{n}", 1))["adapter_model.safetensors"] == b"w" * 4096 for n in range(users))
    return {
        "adapters": users,
        "rotate_s": result.seconds,
        "rewrapped": result.rewrapped,
        "retire_s": round(retire_s, 3),
        "register_all_s": round(setup_s, 1),
        "every_adapter_loads_after_retire": loads == users,
    }


def default_model():
    from core.settings import defaults
    from trainer.model import load_base, resolve_base_model

    s = defaults()
    model, _tokenizer, _device = load_base(resolve_base_model(s.model.base_model, s.model.gguf_file, s.cache_dir), "float32")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--no-model", action="store_true", help="skip the PEFT load (it loads the default model)")
    args = parser.parse_args()
    from tests.support.stores import sealed_store

    model = None if args.no_model else default_model()

    with tempfile.TemporaryDirectory(prefix="adaptloop-bench-enc-") as tmp_name:
        tmp = Path(tmp_name)
        store = sealed_store(tmp)
        runs = [*bench_load(tmp, store.sealer, args.rounds, model), bench_dataset_write(tmp, store, args.rounds)]
        rotation = bench_rotation(tmp, args.users)
    record = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{machine()}, Python {platform.python_version()}",
        "rounds": args.rounds,
        "runs": runs,
        "rotation": rotation,
    }
    for run in runs:
        print(f"{run['what']}: plain {run['plain_ms']} ms, sealed {run['sealed_ms']} ms, overhead {run['overhead']:+.1%}")
    print(
        f"rotation over {rotation['adapters']} adapters: {rotation['rotate_s']} s ({rotation['rewrapped']} data keys re-wrapped); "
        f"retire {rotation['retire_s']} s; every adapter loads after: {rotation['every_adapter_loads_after_retire']}"
    )
    out = REPO / "benchmarks" / "results" / f"encryption-{record['date']}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
