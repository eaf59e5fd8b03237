"""Scale benchmark: user-versions per hour with one trainer, users trained one at a time (K = 1) or K together.

    .venv/bin/python benchmarks/scale.py                     # 24 users x 5 facts, K = 1 and K = 8, default model
    .venv/bin/python benchmarks/scale.py --users 8 --batch 4
    .venv/bin/python benchmarks/scale.py --users 8 --only-batch   # the K = 8 round alone
    (or: make bench-scale)

Synthetic users (benchmarks/learning.py's facts and the worker's dataset
builder), one version each, through the trainer's own code: `JobRunner.run`
one user at a time, then `JobRunner.run_batch` K users at a time (trained in
one batched pass, gated together), each from a fresh registry, in the same
run on the same loaded model. Per K: wall seconds, user-versions per hour,
trainer seconds per user-version, the gate's seconds per candidate, and the
quality of what was learned (facts learned, retention, forgetting: their
means over the users, K's within 0.02 of K = 1 is the goal). Results go to
stdout (a Markdown table) and to --out as JSON; record them in
benchmarks/README.md with the machine and the date.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.host import StolenCpu, machine  # noqa: E402
from benchmarks.learning import loaded_context, make_facts, runner_for  # noqa: E402


def user_jobs(ctx: dict, users: int, facts: int) -> list:
    """One version's job per synthetic user: its facts augmented, one paraphrase each held out."""
    from core.storage import sha256_bytes
    from schemas.dataset import to_jsonl
    from schemas.training import TrainingExample
    from streams.curation import augment
    from streams.dataset import DatasetConfig, build_dataset
    from trainer.job import TrainingJob

    jobs = []
    for u in range(users):
        user = f"user{u}"
        taught = [
            TrainingExample(prompt=q, response=a, event_id=f"{user}-{i}", source="correction", weight=2.0)
            for i, (q, a) in enumerate(make_facts(u, facts))
        ]
        new = augment(taught, ctx["paraphrases"], seed=1, reworded=ctx["rewordings"])
        train, test = build_dataset(
            new, replay_pool=[], global_pool=[], include_global=False, cfg=DatasetConfig.from_settings(), user_id=user
        )
        jobs.append(TrainingJob(user, train, test, f"bench://{user}", sha256_bytes(to_jsonl(train)), trigger="benchmark"))
    return jobs


def run_round(ctx: dict, jobs: list, batch: int, say) -> dict:
    """Every job once, `batch` users at a time, from a fresh registry; the round's figures."""
    from trainer.job import JobHooks

    runner = runner_for(ctx, Path(tempfile.mkdtemp(prefix=f"adaptloop-scale-k{batch}-")))
    started = time.perf_counter()
    outcomes = []
    with StolenCpu() as stolen:
        for start in range(0, len(jobs), batch):
            group = jobs[start : start + batch]
            with tempfile.TemporaryDirectory() as tmp:
                if batch == 1:
                    outcomes.append(runner.run(group[0], Path(tmp)))
                else:
                    outcomes += runner.run_batch([(job, JobHooks()) for job in group], Path(tmp))
            say(f"  K={batch}: {min(start + batch, len(jobs))}/{len(jobs)} users in {time.perf_counter() - started:.0f} s")
    wall = time.perf_counter() - started
    failed = [o for o in outcomes if isinstance(o, Exception)]
    metrics = [o.info.manifest.metrics for o in outcomes if not isinstance(o, Exception)]

    train_seconds = sum(m.train_seconds or 0 for m in metrics)  # in a batch each user's share: together the batch's time

    def mean(name: str) -> float | None:
        values = [getattr(m, name) for m in metrics if getattr(m, name) is not None]
        return round(sum(values) / len(values), 4) if values else None

    return {
        "batch_users": batch,
        "users": len(jobs),
        "failed": [f"{type(e).__name__}: {e}" for e in failed],
        "wall_seconds": round(wall, 1),
        "user_versions_per_hour": round(len(metrics) * 3600 / wall, 1),
        "trainer_seconds_per_user_version": round(wall / max(1, len(metrics)), 1),
        "train_seconds_per_user": mean("train_seconds"),
        "gate_seconds_per_candidate": mean("gate_seconds"),
        "train_tokens_per_s": round(sum(m.tokens or 0 for m in metrics) / train_seconds, 1) if train_seconds else None,
        "facts_learned": mean("facts_learned"),
        "retention": mean("retention"),
        "forgetting": mean("forgetting"),
        "promoted": sum(o.decision == "promoted" for o in outcomes if not isinstance(o, Exception)),
        "users_seen": [_seen(o) for o in outcomes if not isinstance(o, Exception)],
        "cpu_stolen": stolen.share,  # the hypervisor's share of the CPUs' time meanwhile (benchmarks/host.py)
    }


def _seen(outcome) -> dict:
    """One user's version as the round saw it: where training stopped, the shrink, the verdict and its reasons."""
    manifest = outcome.info.manifest
    stopping = manifest.early_stopping
    return {
        "user_id": manifest.user_id,
        "stopped_after_epoch": stopping.stopped_after_epoch,
        "stopped_by": stopping.stopped_by,
        "update_scaled": stopping.update_scaled,
        "decision": outcome.decision,
        "reasons": outcome.report.reasons if outcome.report is not None else [],
    }


def _speedup(rounds: list[dict]) -> float | None:
    """K's user-versions per hour over K = 1's (None with the K round alone)."""
    if len(rounds) < 2:
        return None
    return round(rounds[1]["user_versions_per_hour"] / rounds[0]["user_versions_per_hour"], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=24)
    parser.add_argument("--facts", type=int, default=5, help="facts per user")
    parser.add_argument("--batch", type=int, default=8, help="K: users trained together (compared with K = 1)")
    parser.add_argument("--only-batch", action="store_true", help="the K round alone (no K = 1 to compare with)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / f"scale-{datetime.now(UTC):%Y-%m-%d}.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    ctx = loaded_context()
    base, device = ctx["base"], ctx["device"]
    say = lambda text: print(text, flush=True)  # noqa: E731
    jobs = user_jobs(ctx, args.users, args.facts)
    rounds = [run_round(ctx, jobs, k, say) for k in ((args.batch,) if args.only_batch else (1, args.batch))]
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "device": str(device),
        "base_model": base.model_id,
        "users": args.users,
        "facts_per_user": args.facts,
        "rounds": rounds,
        "speedup": _speedup(rounds),
    }
    args.out.write_text(json.dumps(report, indent=2))
    say(f"\n{report['date']}, {report['machine']}, {report['device']}; {args.users} users x {args.facts} facts")
    say(
        "| K | user-versions/h | trainer s per user-version | train s per user | gate s per candidate | facts | retention | "
        "forgetting | CPU stolen |"
    )
    say("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rounds:
        say(
            f"| {r['batch_users']} | {r['user_versions_per_hour']} | {r['trainer_seconds_per_user_version']} | "
            f"{r['train_seconds_per_user']} | {r['gate_seconds_per_candidate']} | {r['facts_learned']} | {r['retention']} | "
            f"{r['forgetting']} | {r['cpu_stolen']} |"
        )
    for r in rounds:
        for seen in r["users_seen"]:
            if seen["decision"] != "promoted":
                say(f"K={r['batch_users']}: {seen['user_id']} {seen['decision']}: {'; '.join(seen['reasons'])}")
    if report["speedup"] is not None:
        say(f"K={args.batch} vs K=1: {report['speedup']}x user-versions per hour")


if __name__ == "__main__":
    main()
