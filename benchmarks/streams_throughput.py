"""Streams benchmark: the worker's events/s against a raw confluent-kafka consumer.

    .venv/bin/python benchmarks/streams_throughput.py [--events 100000] [--users 500]
    (or: make bench-streams)

Same broker, same topic, same payloads, same run:
  1. raw:       a confluent-kafka consumer that only reads the messages;
  2. validated: the same loop validating each message with the schemas and
                counting it per user (what the brief measured at ~320k/s);
  3. worker:    `adaptloop worker` (validate + curate + count + table), from
                its first consumed event until the last one is applied to state;
  4. latency:   at a steady input rate, produce -> training request p50/p99,
                with every user crossing the threshold once.
Uses KAFKA_BOOTSTRAP_SERVERS, else starts the local jar broker on a free port.
Prints a Markdown table and writes benchmarks/results/streams-<date>.json.

`--footprint` (with `--users 10000`, say) also reports what the worker holds
once every event is applied: its resident memory, and the records, distinct
keys and bytes of each table's changelog, per user.

`--profile FILE` runs the worker under cProfile (slower: compare shares, not
rates), writes its stats to FILE and prints where the worker's time goes,
by package and by function.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import yaml
from confluent_kafka import Consumer, Producer

from benchmarks.host import machine
from core.kafka.broker import LocalBroker, free_port
from core.kafka.client import ClientConfig
from core.kafka.topics import TopicPlan, ensure_topics
from schemas.decode import decode
from schemas.events import Feedback

REPO = Path(__file__).resolve().parents[1]
PARTITIONS = 6


def payloads(n: int, users: int, t0: float = 1_780_000_000.0) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        user = f"user-{i % users}"
        event = {
            "event_id": f"b-{i}",
            "user_id": user,
            "timestamp": datetime.fromtimestamp(t0 + i, UTC).isoformat(),
            "kind": "correction",
            "query": f"What is item {i % 97}?",
            "response": "I don't know.",
            "correction": f"Item {i % 97} is a thing.",
        }
        out.append((user.encode(), json.dumps(event).encode()))
    return out


def produce_all(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "batch.num.messages": 10000,
            "queue.buffering.max.messages": 1_000_000,
            "compression.type": "lz4",
            "partitioner": "murmur2_random",
        }
    )
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(120) == 0


def consume_rate(bootstrap: str, topic: str, n: int, validate: bool) -> float:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    seen = 0
    counts: Counter[str] = Counter()
    started = None
    while seen < n:
        batch = consumer.consume(10000, timeout=1.0)
        if batch and started is None:
            started = time.perf_counter()
        for msg in batch:
            if msg.error():
                continue
            if validate:
                counts[decode(Feedback, msg.value()).user_id] += 1
            seen += 1
    elapsed = time.perf_counter() - (started or time.perf_counter())
    consumer.close()
    return n / elapsed


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("adaptloop_worker_") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            base = name.split("{", 1)[0]
            values[base] = values.get(base, 0.0) + float(value)
    return values


def start_worker(
    bootstrap: str, workdir: Path, topics: dict[str, str], app_id: str, port: int, profile: Path | None = None, **top
) -> subprocess.Popen:
    config = {
        "storage_root": str(workdir / "store"),
        "topics": {k: {"name": v, "partitions": PARTITIONS if k != "dlq" else 1} for k, v in topics.items()},
        "streams": {
            "app_id": app_id,
            "internal_partitions": PARTITIONS,
            "web_port": port,
            "triggers": {"cooldown_s": 0, "accuracy_drop": False},
        },
        **top,
    }
    path = workdir / f"{app_id}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=bootstrap)
    log = open(workdir / f"{app_id}.log", "wb")
    profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []
    proc = subprocess.Popen(
        [sys.executable, *profiler, "-m", "adaptloop.cli", "--config", str(path), "worker", "--loglevel", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            scrape(port)
            return proc
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("worker did not start")


def worker_rate(
    bootstrap: str,
    workdir: Path,
    n: int,
    users: int,
    profile: Path | None = None,
    footprint: dict | None = None,
    schedule: str = "nightly",
) -> tuple[float, float, float]:
    suffix = uuid.uuid4().hex[:6]
    topics = {
        k: f"bench.{k}.{suffix}"
        for k in (
            "intent_traces",
            "feedback",
            "conversations",
            "concept_gaps",
            "commands",
            "training_requests",
            "lifecycle",
            "dlq",
        )
    }
    client = ClientConfig(bootstrap_servers=bootstrap)
    ensure_topics(client, [TopicPlan(t, PARTITIONS if k != "dlq" else 1) for k, t in topics.items()])
    produce_all(bootstrap, topics["feedback"], payloads(n, users))
    raw = consume_rate(bootstrap, topics["feedback"], n, validate=False)
    validated = consume_rate(bootstrap, topics["feedback"], n, validate=True)
    port = free_port()
    # Nothing may trigger training during the run: the nightly schedule (no
    # tick comes), or the threshold schedule with an unreachable threshold
    # (the runs before 2026-12-02; every gap then stays in the users' states).
    triggers = {"schedule": "nightly"} if schedule == "nightly" else {"min_gap_events": 10**6}
    proc = start_worker(bootstrap, workdir, topics, f"bench-{suffix}", port, profile, **triggers)
    try:
        first = None
        while True:
            m = scrape(port)
            if first is None and m.get("adaptloop_worker_events_consumed_total", 0) > 0:
                first = time.perf_counter()
            if m.get("adaptloop_worker_events_processed_total", 0) >= n:
                done = time.perf_counter()
                break
            time.sleep(0.1)
        if footprint is not None:
            footprint.update(measure_footprint(client, proc.pid, f"bench-{suffix}", users))
    finally:
        proc.terminate()
        proc.wait(30)
    return raw, validated, n / (done - first)


def measure_footprint(client: ClientConfig, pid: int, app_id: str, users: int) -> dict:
    """The worker's resident memory and its tables' changelogs (records, distinct keys, bytes), also per user."""
    from core.kafka.io import read_since
    from core.settings import changelog_topic

    status = Path(f"/proc/{pid}/status").read_text()
    memory = {
        k: int(line.split()[1]) / 1024 for line in status.splitlines() for k in ("VmRSS", "VmHWM") if line.startswith(k + ":")
    }
    out: dict = {"users": users, "rss_mib": round(memory.get("VmRSS", 0), 1), "peak_rss_mib": round(memory.get("VmHWM", 0), 1)}
    for table in ("users", "seen", "examples"):
        records = size = 0
        seen_keys = set()
        for record in read_since(client, [changelog_topic(app_id, table)]):
            records += 1
            size += len(record.key or b"") + len(record.value or b"")
            seen_keys.add(record.key)
        out[table] = {
            "records": records,
            "keys": len(seen_keys),
            "mib": round(size / 2**20, 2),
            "bytes_per_user": round(size / users),
        }
    return out


def latency(bootstrap: str, workdir: Path, users: int, rate: float, gaps: int = 5) -> dict[str, float]:
    suffix = uuid.uuid4().hex[:6]
    topics = {
        k: f"lat.{k}.{suffix}"
        for k in (
            "intent_traces",
            "feedback",
            "conversations",
            "concept_gaps",
            "commands",
            "training_requests",
            "lifecycle",
            "dlq",
        )
    }
    client = ClientConfig(bootstrap_servers=bootstrap)
    ensure_topics(client, [TopicPlan(t, PARTITIONS if k != "dlq" else 1) for k, t in topics.items()])
    port = free_port()
    proc = start_worker(
        bootstrap,
        workdir,
        topics,
        f"lat-{suffix}",
        port,
        min_gap_events=gaps,
        streams={
            "app_id": f"lat-{suffix}",
            "internal_partitions": PARTITIONS,
            "web_port": port,
            "batch_within_s": 0.05,
            "triggers": {"cooldown_s": 0},
        },
    )
    try:
        time.sleep(3)
        events = payloads(users * gaps, users)
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "partitioner": "murmur2_random"})
        sent_at: dict[str, float] = {}
        start = time.time()
        for i, (key, value) in enumerate(events):
            target = start + i / rate
            if (delay := target - time.time()) > 0:
                time.sleep(delay)
            producer.produce(topics["feedback"], value=value, key=key)
            producer.poll(0)
            sent_at[key.decode()] = time.time()  # the last one sent crosses the threshold
        producer.flush(30)
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"lat-reader-{suffix}", "auto.offset.reset": "earliest"})
        consumer.subscribe([topics["training_requests"]])
        waits = []
        deadline = time.time() + 120
        while len(waits) < users and time.time() < deadline:
            msg = consumer.poll(1.0)
            if msg is None or msg.error():
                continue
            user = json.loads(msg.value())["user_id"]
            waits.append(msg.timestamp()[1] / 1000 - sent_at[user])
        consumer.close()
    finally:
        proc.terminate()
        proc.wait(30)
    waits.sort()
    return {
        "requests": len(waits),
        "p50_ms": 1000 * statistics.median(waits),
        "p99_ms": 1000 * waits[max(0, int(len(waits) * 0.99) - 1)],
        "rate_events_s": rate,
    }


@contextlib.contextmanager
def kafka(workdir: Path) -> Iterator[str]:
    """KAFKA_BOOTSTRAP_SERVERS when set, else the local jar broker on a free port for the run."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    broker = LocalBroker(port=free_port(), cache_dir=Path.home() / ".cache" / "adaptloop", data_dir=workdir / "kafka", heap="1g")
    try:
        yield broker.up()
    finally:
        broker.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--latency-users", type=int, default=400)
    parser.add_argument("--latency-rate", type=float, default=500.0, help="events/s during the latency run")
    parser.add_argument("--profile", type=Path, default=None, help="profile the worker's run into this file (no latency run)")
    parser.add_argument("--footprint", action="store_true", help="also measure the worker's memory and changelog sizes")
    parser.add_argument(
        "--schedule",
        choices=("nightly", "threshold"),
        default="nightly",
        help="how the worker is kept from triggering training during the run (threshold: as before 2026-12-02)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the JSON result (default: results/streams-<date>.json, or footprint-<date>.json with --footprint)",
    )
    args = parser.parse_args()
    if args.profile:
        profile_worker(args)
        return
    if args.footprint:
        footprint_run(args)
        return

    workdir = Path(tempfile.mkdtemp(prefix="adaptloop-bench-"))
    with kafka(workdir) as bootstrap:
        raw, validated, worker = worker_rate(bootstrap, workdir, args.events, args.users, schedule=args.schedule)
        lat = latency(bootstrap, workdir, args.latency_users, args.latency_rate)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {machine()}, Python {platform.python_version()}",
        "events": args.events,
        "users": args.users,
        "schedule": args.schedule,
        "raw_consumer_events_s": round(raw),
        "validating_consumer_events_s": round(validated),
        "worker_events_s": round(worker),
        "worker_vs_raw": round(worker / raw, 3),
        "latency": {k: round(v, 1) for k, v in lat.items()},
    }
    out = args.out or REPO / "benchmarks" / "results" / f"streams-{result['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print()
    print("| run | events/s | vs raw |")
    print("| --- | ---: | ---: |")
    print(f"| raw confluent-kafka consumer | {raw:,.0f} | 1.00 |")
    print(f"| confluent-kafka + pydantic validate + count | {validated:,.0f} | {validated / raw:.2f} |")
    print(f"| adaptloop worker (validate, curate, count, table) | {worker:,.0f} | {worker / raw:.2f} |")
    print(
        f"\nproduce -> training request at {lat['rate_events_s']:.0f} events/s: p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms ({lat['requests']:.0f} requests)"
    )


def footprint_run(args: argparse.Namespace) -> None:
    """The worker's rate and what it holds afterwards, for `--users` users (no latency run)."""
    workdir = Path(tempfile.mkdtemp(prefix="adaptloop-footprint-"))
    footprint: dict = {}
    with kafka(workdir) as bootstrap:
        _raw, _validated, rate = worker_rate(
            bootstrap, workdir, args.events, args.users, footprint=footprint, schedule=args.schedule
        )
    footprint["worker_events_s"] = round(rate)
    footprint["events"] = args.events
    footprint["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    out = args.out or REPO / "benchmarks" / "results" / f"footprint-{footprint['date'][:10]}.json"
    out.write_text(json.dumps(footprint, indent=2) + "\n")
    print(json.dumps(footprint, indent=2))


def profile_worker(args: argparse.Namespace) -> None:
    """The worker's run under cProfile: where its time goes, by package and by function."""
    import pstats

    workdir = Path(tempfile.mkdtemp(prefix="adaptloop-profile-"))
    with kafka(workdir) as bootstrap:
        _raw, _validated, rate = worker_rate(
            bootstrap, workdir, args.events, args.users, args.profile.resolve(), schedule=args.schedule
        )
    stats = pstats.Stats(str(args.profile))
    by_package: Counter[str] = Counter()
    rows = []
    for (filename, line, name), (_cc, _nc, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        by_package[_package(filename)] += tottime
        rows.append((tottime, cumtime, f"{_package(filename)}:{Path(filename).name}:{line}({name})"))
    total = sum(by_package.values())
    print(f"worker under cProfile: {rate:,.0f} events/s; {total:.1f} s of own time, by package:")
    for package, seconds in by_package.most_common(15):
        print(f"  {100 * seconds / total:5.1f}%  {package}")
    print("functions by own time:")
    for tottime, cumtime, where in sorted(rows, reverse=True)[:25]:
        print(f"  {100 * tottime / total:5.1f}%  (cumulative {100 * cumtime / total:5.1f}%)  {where}")


def _package(filename: str) -> str:
    """The top-level package a profiled function lives in (`~` builtins, the standard library as `stdlib:<module>`)."""
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins"
    parts = Path(filename).parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1]
    for root in ("streams", "schemas", "core", "adaptloop"):
        if root in parts:
            return root
    return f"stdlib:{Path(filename).stem}"


if __name__ == "__main__":
    main()
