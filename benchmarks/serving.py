"""Serving benchmark: `adaptloop serve` batching many users against the same requests one at a time.

    .venv/bin/python benchmarks/serving.py [--users 16] [--max-tokens 64] [--swaps 20]
    (or: make bench-serve)

One `adaptloop serve` process on the default model (the embedded
SmolLM2-135M-Instruct), a registry of `--users` users, each with an adapter
of their own of the default LoRA shape (rank `lora.r`, 16 until 2026-12-06
and 8 since, on every linear layer of the top `lora.top_layer_share` of the
decoder: the top half until 2026-12-04, the top third since; weights drawn at random so each changes its user's answers). Every request streams (`stream: true`, as a chat app would) and
generates exactly `--max-tokens` tokens (`ignore_eos`), greedy. Both sides
run `--rounds` times, alternating; medians are reported.

- batched vs one at a time: the users' requests sent together (each its own
  adapter) against the same requests sent one after another to the same
  server: generated tokens/s of each; p50/p99 request latency and time to the
  first token;
- the adapter's cost: one user's requests against the same requests answered
  by the base model (no `user`), one at a time and 16 together;
- swap latency: a new version registered and activated, its `promoted` event
  published (what a trainer does), then the user's next answers until one comes
  from the new version: from the event to that answer, p50/p99 over `--swaps`.

Uses KAFKA_BOOTSTRAP_SERVERS, else starts the local jar broker on a free port.
Writes benchmarks/results/serving-<date>.json and prints a table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.host import machine  # noqa: E402

QUESTION = "Tell me about my week, please."


@dataclass
class Timing:
    tokens: int
    latency_s: float
    first_token_s: float
    fingerprint: str


def make_adapters(store: Path, users: list[str], workdir: Path) -> None:
    """Each user an active v1 of the default LoRA shape, with random weights of their own."""
    import torch

    from core.settings import defaults
    from schemas.manifest import AdapterManifest
    from trainer.lora import add_lora
    from trainer.model import EMBEDDED_SMOLLM, load_base, resolve_base_model
    from trainer.registry import AdapterRegistry

    s = defaults()
    base = resolve_base_model(EMBEDDED_SMOLLM, None, Path.home() / ".cache" / "adaptloop")
    model, _tokenizer, _device = load_base(base, "float32")
    peft_model = add_lora(model, s.lora.r, s.lora.alpha, 0.0, tuple(s.lora.target_modules), s.lora.top_layer_share)
    registry = AdapterRegistry(store)
    for n, user in enumerate(users):
        generator = torch.Generator().manual_seed(n)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:  # small enough to keep answers fluent, large enough to change them
                    param.copy_(torch.randn(param.shape, generator=generator) * (0.02 if "lora_A" in name else 0.01))
        path = workdir / "adapters" / user
        peft_model.save_pretrained(path, safe_serialization=True)
        info = registry.register(user, path, AdapterManifest.model_validate({"request_id": f"bench-{user}"}))
        registry.activate(user, info.version, reason="benchmark")


def start_serve(config: Path, port: int, bootstrap: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=bootstrap, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "adaptloop.cli", "--config", str(config), "serve", "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json().get("following_lifecycle"):
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)  # polling a starting server's health
    raise SystemExit(f"serve did not become ready; see {log}")


class Client:
    def __init__(self, url: str, token: str, max_tokens: int) -> None:
        self.url, self.max_tokens = url, max_tokens
        self.http = httpx.Client(timeout=600, headers={"Authorization": f"Bearer {token}"})
        self.base = self.http.get(f"{url}/v1/models").json()["data"][0]["id"]  # the base model's name

    def ask(self, user: str | None, max_tokens: int | None = None) -> Timing:
        """One streamed request; its tokens, latency, time to first token and what answered it."""
        body = {
            "model": self.base if user is None else user,
            "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0,
            "max_tokens": max_tokens or self.max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        started, first, tokens, fingerprint = time.perf_counter(), None, 0, ""
        with self.http.stream("POST", f"{self.url}/v1/chat/completions", json=body) as reply:
            reply.raise_for_status()
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                fingerprint = chunk.get("system_fingerprint", fingerprint)
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        done = time.perf_counter()
        return Timing(tokens, done - started, (first or done) - started, fingerprint)


def one_at_a_time(client: Client, users: list[str | None]) -> tuple[float, list[Timing]]:
    started = time.perf_counter()
    timings = [client.ask(u) for u in users]
    return sum(t.tokens for t in timings) / (time.perf_counter() - started), timings


def together(client: Client, users: list[str | None]) -> tuple[float, list[Timing]]:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(users)) as pool:
        timings = list(pool.map(client.ask, users))
    return sum(t.tokens for t in timings) / (time.perf_counter() - started), timings


def swap_latencies(client: Client, store: Path, workdir: Path, bootstrap: str, lifecycle: str, users: list[str], swaps: int):
    """From a `promoted` event (after the registry's activation, as a trainer does it) to the first answer by the new version."""
    from core.kafka.client import ClientConfig
    from core.kafka.io import produce
    from schemas import LifecycleEvent
    from schemas.manifest import AdapterManifest
    from trainer.registry import AdapterRegistry

    registry, kafka, out = AdapterRegistry(store), ClientConfig(bootstrap_servers=bootstrap), []
    for n in range(swaps):
        user = users[n % len(users)]
        previous = registry.active(user)
        info = registry.register(
            user, workdir / "adapters" / users[(n + 1) % len(users)], AdapterManifest.model_validate({"request_id": f"swap-{n}"})
        )
        registry.activate(user, info.version, reason="benchmark swap")
        event = LifecycleEvent(
            event_id=f"bench-{uuid.uuid4().hex}", type="promoted", user_id=user, version=info.version, previous_version=previous
        )
        started = time.perf_counter()
        produce(kafka, lifecycle, [(user, event.to_bytes())])
        while not client.ask(user, max_tokens=1).fingerprint.startswith(f"adaptloop:{user}@v{info.version}:"):
            pass
        out.append(time.perf_counter() - started)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both sides; the medians are reported")
    args = parser.parse_args()

    from api.auth import TokenStore
    from core.kafka.broker import LocalBroker, free_port
    from core.settings import TopicsSettings

    workdir = Path(tempfile.mkdtemp(prefix="adaptloop-bench-serve-"))
    broker, bootstrap = None, os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        broker = LocalBroker(port=free_port(), cache_dir=Path.home() / ".cache" / "adaptloop", data_dir=workdir / "kafka")
        bootstrap = broker.up()
    users = [f"bench-user-{n:02d}" for n in range(args.users)]
    store, port, suffix = workdir / "store", free_port(), uuid.uuid4().hex[:6]
    lifecycle = f"bench.serve.lifecycle.{suffix}"  # as below
    config = workdir / "settings.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage_root": str(store),
                "topics": {
                    name: {"name": f"bench.serve.{name}.{suffix}", "partitions": 1} for name in TopicsSettings.model_fields
                },
                "streams": {"internal_partitions": 1},
                "serving": {"max_resident_adapters": args.users + 8, "max_batch_size": args.users, "max_tokens": 1024},
            }
        )
    )
    print(f"building {args.users} adapters of the default LoRA shape in {workdir}", flush=True)
    make_adapters(store, users, workdir)
    token = TokenStore(store / "api" / "tokens.json").create(["admin"])[1]
    proc = None
    try:
        proc = start_serve(config, port, bootstrap, workdir / "serve.log")
        client = Client(f"http://127.0.0.1:{port}", token, args.max_tokens)
        together(client, [*users, None])  # warm-up: every adapter loaded, every shape seen once
        result = measure(client, users, args)
        result["swap_s"] = swap_latencies(client, store, workdir, bootstrap, lifecycle, users, args.swaps)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
        if broker:
            broker.down()
    report(result, args)


def measure(client: Client, users: list[str], args) -> dict:
    sequential_rates, batched_rates, sequential, batched = [], [], [], []
    for n in range(args.rounds):  # alternating, so a slow spell of the machine hits both sides
        print(f"round {n + 1}/{args.rounds}: one at a time, then together (each user's adapter)...", flush=True)
        rate, timings = one_at_a_time(client, users)
        sequential_rates.append(rate)
        sequential += timings
        rate, timings = together(client, users)
        batched_rates.append(rate)
        batched += timings
    sequential_tps, batched_tps = statistics.median(sequential_rates), statistics.median(batched_rates)
    print("the adapter's cost: one user vs the base model...", flush=True)
    one_user = users[0]
    alone_adapter = one_at_a_time(client, [one_user] * 4)[0]
    alone_base = one_at_a_time(client, [None] * 4)[0]
    many_adapter = together(client, [one_user] * len(users))[0]
    many_base = together(client, [None] * len(users))[0]
    return {
        "sequential_tokens_s": sequential_tps,
        "batched_tokens_s": batched_tps,
        "rounds": {"sequential_tokens_s": sequential_rates, "batched_tokens_s": batched_rates},
        "batched_latency_s": [t.latency_s for t in batched],
        "batched_first_token_s": [t.first_token_s for t in batched],
        "sequential_latency_s": [t.latency_s for t in sequential],
        "sequential_first_token_s": [t.first_token_s for t in sequential],
        "distinct_fingerprints_batched": len({t.fingerprint for t in batched}),
        "one_request": {"base_tokens_s": alone_base, "adapter_tokens_s": alone_adapter},
        "sixteen_together": {"base_tokens_s": many_base, "adapter_tokens_s": many_adapter},
    }


def report(r: dict, args) -> None:
    def ms(values: list[float], q: float) -> float:
        return round(pct(values, q) * 1000)

    summary = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {machine()}, Python {platform.python_version()}",
        "device": _device(),
        "users": args.users,
        "max_tokens": args.max_tokens,
        "sequential_tokens_s": round(r["sequential_tokens_s"], 1),
        "batched_tokens_s": round(r["batched_tokens_s"], 1),
        "batched_vs_sequential": round(r["batched_tokens_s"] / r["sequential_tokens_s"], 2),
        "rounds": {k: [round(v, 1) for v in values] for k, values in r["rounds"].items()},
        "latency_ms": {
            "batched_p50": ms(r["batched_latency_s"], 50),
            "batched_p99": ms(r["batched_latency_s"], 99),
            "sequential_p50": ms(r["sequential_latency_s"], 50),
            "sequential_p99": ms(r["sequential_latency_s"], 99),
        },
        "first_token_ms": {
            "batched_p50": ms(r["batched_first_token_s"], 50),
            "batched_p99": ms(r["batched_first_token_s"], 99),
            "sequential_p50": ms(r["sequential_first_token_s"], 50),
            "sequential_p99": ms(r["sequential_first_token_s"], 99),
        },
        "adapter_cost": {
            "one_request_base_tokens_s": round(r["one_request"]["base_tokens_s"], 1),
            "one_request_adapter_tokens_s": round(r["one_request"]["adapter_tokens_s"], 1),
            "one_request_adapter_vs_base": round(r["one_request"]["adapter_tokens_s"] / r["one_request"]["base_tokens_s"], 3),
            "together_base_tokens_s": round(r["sixteen_together"]["base_tokens_s"], 1),
            "together_adapter_tokens_s": round(r["sixteen_together"]["adapter_tokens_s"], 1),
            "together_adapter_vs_base": round(
                r["sixteen_together"]["adapter_tokens_s"] / r["sixteen_together"]["base_tokens_s"], 3
            ),
            "together_distinct_adapters_vs_base": round(r["batched_tokens_s"] / r["sixteen_together"]["base_tokens_s"], 3),
        },
        "swap_ms": {"p50": ms(r["swap_s"], 50), "p99": ms(r["swap_s"], 99), "max": round(max(r["swap_s"]) * 1000)},
        "swaps": len(r["swap_s"]),
    }
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"serving-{summary['date'][:10]}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
