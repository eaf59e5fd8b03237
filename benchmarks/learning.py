"""Learning benchmark: do adapters learn a user's facts and leave everything else alone?

    .venv/bin/python benchmarks/learning.py                      # 5 users x 3 versions x 5 new facts
    .venv/bin/python benchmarks/learning.py --ablation           # plus variants with techniques off (on 1 user)
    (or: make bench-learning)

Synthetic users, each taught new facts (with paraphrases) in consecutive
versions, through the trainer's own code on the default model (the settings
file's training, anchors and gate): the worker's dataset builder (one
paraphrase per fact held out; the previous dataset replayed), then
`train_version` (a warm start from the active version, one replayed reminder
per earlier fact, anchors nearest the user's prompts held by symmetric KL,
early stopping, the gate). For every version, from its manifest:

- facts learned: the share of its held-out paraphrases answered (key phrase present);
- retention: the share of the core suite's general prompts (never trained on,
  disjoint from the anchor set) answered as the base model answers them;
- forgetting: the share of the previous active version's learned facts the
  new version no longer answers;
- training seconds, and the gate's decision.

Goals (2-core CPU, default model): facts >= 90%, retention >= 95%,
forgetting <= 5%, training <= 120 s per version. Results go to stdout (a
Markdown table) and to --out as JSON; record them in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.host import machine  # noqa: E402

NAMES = ["Pixel", "Biscuit", "Juniper", "Marlowe", "Tansy", "Quill", "Odette", "Rasmus", "Wren", "Calloway", "Ysolde", "Fennick"]
CITIES = ["Dundee", "Tromsø", "Valparaíso", "Ghent", "Kraków", "Hobart", "Bergen", "Lviv", "Oaxaca", "Tartu", "Cork", "Nantes"]
COMPANIES = ["Brightwater Labs", "Koru Freight", "Halden Optics", "Mistral Bakery", "Ostrava Steel", "Pemberton & Vane"]
FACT_TEMPLATES = [
    ("What is my {x} called?", "Your {x} is called {name}.", ["cat", "dog", "boat", "tortoise", "parrot", "bicycle"], NAMES),
    (
        "Which city was my {x} born in?",
        "Your {x} was born in {name}.",
        ["sister", "brother", "mother", "father", "grandmother", "cousin"],
        CITIES,
    ),
    ("What is my {x} number?", "Your {x} number is {name}.", ["locker", "badge", "member", "desk", "gym", "parking"], None),
    (
        "Which company does my {x} work for?",
        "Your {x} works for {name}.",
        ["neighbour", "uncle", "aunt", "flatmate", "partner", "friend"],
        COMPANIES,
    ),
]


def make_facts(user: int, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` distinct (question, answer) facts for one user (no question repeats)."""
    rng = random.Random(f"{seed}-{user}")
    slots = [(t, x) for t in FACT_TEMPLATES for x in t[2]]
    rng.shuffle(slots)
    facts = []
    for (question, answer, _xs, values), x in slots[:count]:
        name = rng.choice(values) if values else str(rng.randint(1000, 99999))
        facts.append((question.format(x=x), answer.format(x=x, name=name)))
    return facts


# name -> (TrainConfig / AnchorMix changes, "anchors": False to leave them out; replay the previous dataset)
_FROM_ZERO = {"warm_start": False, "replay_per_fact": 0, "shrink_to": ()}
VARIANTS = {
    "plain LoRA": ({"anchors": False, "early_stopping": False, **_FROM_ZERO}, False),
    "+ anchors (CE on base answers)": ({"anchor_kl": 0.0, "nearest": 0.0, "early_stopping": False, **_FROM_ZERO}, False),
    "+ anchors (KL to the base model)": ({"nearest": 0.0, "early_stopping": False, **_FROM_ZERO}, False),
    "+ nearest anchors": ({"early_stopping": False, **_FROM_ZERO}, False),
    "+ early stopping": (dict(_FROM_ZERO), False),
    "+ replay buffer (every example)": (dict(_FROM_ZERO), True),
    "+ warm start, two reminders per fact": ({"shrink_to": ()}, True),
    "+ update shrunk while it keeps the facts (default)": ({}, True),
}
DEFAULT = "+ update shrunk while it keeps the facts (default)"


def runner_for(ctx: dict, registry_dir: Path, cfg=None, anchors="settings", mix=None, paraphraser="settings"):
    """A JobRunner on the loaded context (its training config, gate, anchors, mix and paraphraser unless given) and
    a registry."""
    from trainer.job import JobRunner
    from trainer.registry import AdapterRegistry

    return JobRunner(
        AdapterRegistry(registry_dir),
        ctx["base"],
        ctx["model"],
        ctx["tokenizer"],
        ctx["device"],
        cfg or ctx["train_cfg"],
        ctx["gate"],
        ctx["anchors"] if anchors == "settings" else anchors,
        mix or ctx["anchor_mix"],
        paraphraser=ctx["paraphraser"] if paraphraser == "settings" else paraphraser,
    )


def train_version(runner, user: str, train: list, test: list):
    """One version of `user` through the trainer's job (train, gate, register); the Outcome."""
    from core.storage import sha256_bytes
    from schemas.dataset import to_jsonl
    from trainer.job import TrainingJob

    job = TrainingJob(user, train, test, f"bench://{user}", sha256_bytes(to_jsonl(train)), trigger="benchmark")
    with tempfile.TemporaryDirectory() as tmp:
        return runner.run(job, Path(tmp))


def gate_reasons(outcome) -> list[str]:
    """Why the gate decided as it did (none when no gate ran)."""
    return outcome.report.reasons if outcome.report is not None else []


def run_user(
    ctx: dict, user: str, facts_per_version: list[list[tuple[str, str]]], training: dict, replay: bool, say
) -> list[dict]:
    from schemas.training import TrainingExample
    from streams.curation import augment
    from streams.dataset import DatasetConfig, build_dataset
    from trainer.anchors import AnchorMix
    from trainer.train import TrainConfig

    cfg = replace(ctx["train_cfg"], **{k: v for k, v in training.items() if k in TrainConfig.__dataclass_fields__})
    mix = replace(ctx["anchor_mix"], **{k: v for k, v in training.items() if k in AnchorMix.__dataclass_fields__})
    anchors = ctx["anchors"] if training.get("anchors", True) else None
    runner = runner_for(ctx, ctx["root"] / user, cfg, anchors, mix)
    previous: list[TrainingExample] = []
    rows = []
    for version, facts in enumerate(facts_per_version, start=1):
        taught = [
            TrainingExample(prompt=q, response=a, event_id=f"{user}-v{version}-{i}", source="correction", weight=2.0)
            for i, (q, a) in enumerate(facts)
        ]
        new = augment(taught, ctx["paraphrases"], seed=version, reworded=ctx["rewordings"])
        train, test = build_dataset(
            new,
            replay_pool=previous if replay else [],
            global_pool=[],
            include_global=False,
            cfg=DatasetConfig.from_settings(),
            user_id=user,
        )
        outcome = train_version(runner, user, train, test)
        m = outcome.info.manifest.metrics
        row = {
            "user": user,
            "version": version,
            "facts": len(facts),
            "train_examples": len(train),
            "facts_learned": m.facts_learned,
            "retention": m.retention,
            "forgetting": m.forgetting,
            "train_seconds": m.train_seconds,
            "gate_seconds": m.gate_seconds,
            "decision": outcome.decision,
            "reasons": gate_reasons(outcome),
        }
        rows.append(row)
        say(
            f"  {user} v{version}: facts {row['facts_learned']}, retention {row['retention']}, forgetting {row['forgetting']}, "
            f"{row['train_seconds']:.0f}s training, {row['decision']}" + "".join(f"; {reason}" for reason in row["reasons"])
        )
        previous = train
    return rows


def summary(rows: list[dict]) -> dict:
    def mean(key: str) -> float | None:
        values = [r[key] for r in rows if r[key] is not None]
        return round(sum(values) / len(values), 4) if values else None

    return {
        "versions": len(rows),
        "facts_learned": mean("facts_learned"),
        "retention": mean("retention"),
        "forgetting": mean("forgetting"),
        "train_seconds": mean("train_seconds"),
        "max_train_seconds": max((r["train_seconds"] for r in rows), default=None),
        "promoted": sum(r["decision"] == "promoted" for r in rows),
    }


def loaded_context(quantization: str | None = None) -> dict:
    """The settings' base model loaded once, with the training config, gate and anchors the trainer would build
    (`quantization`: the settings' training.quantization unless given)."""
    from core.settings import load_settings
    from trainer.anchors import AnchorMix, AnchorSet
    from trainer.gate import GateSpec
    from trainer.job import paraphraser_from_settings
    from trainer.model import load_base, resolve_base_model
    from trainer.train import TrainConfig

    settings = load_settings()
    base = resolve_base_model(settings.model.base_model, settings.model.gguf_file, settings.cache_dir)
    model, tokenizer, device = load_base(base, settings.model.dtype, quantization or settings.training.quantization)
    return {
        "settings": settings,
        "base": base,
        "model": model,
        "tokenizer": tokenizer,
        "device": device,
        "train_cfg": TrainConfig.from_settings(settings),
        "gate": GateSpec.from_settings(settings).build(model, tokenizer, device, base.sha256),
        "anchor_mix": AnchorMix.from_settings(settings),
        "anchors": AnchorSet.from_settings(settings, base.sha256, model),
        "paraphraser": paraphraser_from_settings(settings, model, tokenizer, device),
        "paraphrases": settings.streams.curation.paraphrases,
        "rewordings": settings.streams.curation.rewordings,
    }


def answers_with(ctx: dict, adapter_dir: Path | None, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy answers of the base model plus the adapter (None: the base model alone)."""
    from trainer.generation import generate_batch
    from trainer.lora import adapter_applied

    with adapter_applied(ctx["model"], adapter_dir) as model:
        return generate_batch(model, ctx["tokenizer"], ctx["device"], prompts, max_new_tokens)


REWORDINGS = REPO / "benchmarks" / "data" / "rewordings.jsonl"


def model_paraphraser(ctx: dict, count: int = 2):
    """The trainer's paraphrase step as `training.model_paraphrases: count` builds it (2 in the shipped settings)."""
    from trainer.job import paraphraser_from_settings

    settings = ctx["settings"]
    settings = settings.model_copy(update={"training": settings.training.model_copy(update={"model_paraphrases": count})})
    return paraphraser_from_settings(settings, ctx["model"], ctx["tokenizer"], ctx["device"])


def _never_asked(train: list, asked: list[str]) -> tuple[list, int]:
    """`train` without the examples whose question is one of the hand-written rewordings (a rule may write one of
    them word for word: trained on, it would no longer measure words the model never saw), and how many went."""
    folded = {" ".join(text.casefold().split()) for text in asked}
    kept = [example for example in train if " ".join(example.prompt.casefold().split()) not in folded]
    return kept, len(train) - len(kept)


def _with_key_words(asked: list[tuple[dict, str]], answers: list[str]) -> list[bool]:
    """Per (fact, wording) asked, whether its answer holds every key word of the fact."""
    return [all(key.casefold() in answer.casefold() for key in fact["key"]) for (fact, _), answer in zip(asked, answers)]


def rewording_user(ctx: dict, user: str, facts: list[dict], wordings: tuple[int, int], paraphraser, say) -> dict:
    """One version taught `facts` (one correction event each, through the worker's curation and dataset builder, with
    `wordings` = (templates, rule rewordings) per example; the trainer's `paraphraser` or None), asked the
    hand-written rewordings it never saw."""
    from schemas.events import Feedback
    from streams.curation import augment, curate, dedupe
    from streams.dataset import DatasetConfig, build_dataset

    curation = ctx["settings"].streams.curation
    corrections = [
        Feedback(
            event_id=f"{user}-{n}",
            user_id=user,
            timestamp=datetime(2026, 12, 1, tzinfo=UTC),
            kind="correction",
            query=fact["question"],
            response="I'm sorry, I don't know that.",
            correction=fact["answer"],
        )
        for n, fact in enumerate(facts)
    ]
    taught = [example for event in corrections for example in curate(event, None, curation).examples]
    new = dedupe(augment(taught, wordings[0], curation.seed, wordings[1]))
    train, test = build_dataset(
        new, replay_pool=[], global_pool=[], include_global=False, cfg=DatasetConfig.from_settings(ctx["settings"]), user_id=user
    )
    asked = [(fact, wording) for fact in facts for wording in fact["rewordings"]]
    train, removed = _never_asked(train, [wording for _, wording in asked])
    started = time.perf_counter()
    outcome = train_version(runner_for(ctx, ctx["root"] / user, paraphraser=paraphraser), user, train, test)
    version_seconds = round(time.perf_counter() - started, 1)
    wordings = [wording for _, wording in asked]
    answers = answers_with(ctx, outcome.info.path, wordings)
    hits = _with_key_words(asked, answers)
    # What the user is served: the candidate once promoted, else the base model (a rejected candidate reaches no one).
    served = answers if outcome.decision == "promoted" else answers_with(ctx, None, wordings)
    served_hits = _with_key_words(asked, served)
    m = outcome.info.manifest.metrics
    row = {
        "user": user,
        "train_examples": len(train),
        "asked_wordings_removed_from_training": removed,
        "rewordings_asked": len(asked),
        "rewordings_answered": sum(hits),
        "rewordings_answered_as_served": sum(served_hits),
        "facts_learned": m.facts_learned,
        "retention": m.retention,
        "train_seconds": m.train_seconds,
        "version_seconds": version_seconds,
        "decision": outcome.decision,
        "reasons": gate_reasons(outcome),
        "misses": [[wording, answer] for (_, wording), answer, hit in zip(asked, answers, hits) if not hit],
    }
    say(
        f"  {user}: {sum(hits)}/{len(asked)} rewordings answered ({sum(served_hits)} as served), "
        f"held-out {m.facts_learned}, retention {m.retention}, {m.train_seconds:.0f}s training, "
        f"{version_seconds:.0f}s in all, {outcome.decision}"
    )
    return row


REWORDING_ARMS = ("templates", "rules", "paraphrases")


def rewording_benchmark(ctx: dict, say, only: tuple[str, ...] = REWORDING_ARMS) -> dict:
    """20 facts (4 users x 5), each taught by one correction; 40 hand-written rewordings never trained on or tuned on
    (benchmarks/data/rewordings.jsonl): answered with the key words? Templates only, + the rule rewordings, + the
    base model's paraphrases (`only`: those of the three arms)."""
    facts = [json.loads(line) for line in REWORDINGS.read_text(encoding="utf-8").splitlines() if line.strip()]
    results = {}
    shipped = (ctx["paraphrases"], ctx["rewordings"])
    arms = (
        ("templates", "templates only (2 per example, the augmentation before 12-02)", (2, 0), lambda: None),
        ("rules", f"{shipped[0]} templates + {shipped[1]} rule rewordings", shipped, lambda: None),
        (
            "paraphrases",
            "the rules + model paraphrases (default)",
            shipped,
            lambda: ctx["paraphraser"] or model_paraphraser(ctx),
        ),
    )
    for n, (key, name, wordings, paraphraser_of) in enumerate(arms):
        if key not in only:
            continue
        paraphraser = paraphraser_of()
        say(f"{name}:")
        rows = [rewording_user(ctx, f"reworded{u}-{n}", facts[u * 5 : u * 5 + 5], wordings, paraphraser, say) for u in range(4)]
        asked = sum(r["rewordings_asked"] for r in rows)
        results[name] = {
            "rows": rows,
            "answered": round(sum(r["rewordings_answered"] for r in rows) / asked, 4),
            "answered_as_served": round(sum(r["rewordings_answered_as_served"] for r in rows) / asked, 4),
            "held_out_learned": round(statistics.mean(r["facts_learned"] or 0 for r in rows), 4),
            "retention": round(statistics.mean(r["retention"] or 0 for r in rows), 4),
            "train_seconds": round(statistics.mean(r["train_seconds"] for r in rows), 1),
            "max_train_seconds": max(r["train_seconds"] for r in rows),
            "version_seconds": round(statistics.mean(r["version_seconds"] for r in rows), 1),
            "promoted": sum(r["decision"] == "promoted" for r in rows),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--versions", type=int, default=3)
    parser.add_argument("--facts", type=int, default=5, help="new facts per version")
    parser.add_argument("--ablation", action="store_true", help="also run the variants with techniques switched off")
    parser.add_argument("--ablation-users", type=int, default=1, help="how many of the users the ablation variants run on")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / f"learning-{datetime.now(UTC):%Y-%m-%d}.json"
    )
    parser.add_argument(
        "--rewordings",
        action="store_true",
        help="instead: 20 facts taught by one correction each, asked in 40 hand-written rewordings (templates, rules, model)",
    )
    parser.add_argument(
        "--arms", default=",".join(REWORDING_ARMS), help="with --rewordings: which arms, of " + ",".join(REWORDING_ARMS)
    )
    args = parser.parse_args()
    if not set(args.arms.split(",")) <= set(REWORDING_ARMS):
        parser.error(f"--arms: each of {', '.join(REWORDING_ARMS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("adaptloop.trainer").setLevel(logging.INFO)

    ctx = {**loaded_context(), "root": Path(tempfile.mkdtemp(prefix="adaptloop-bench-"))}
    base, device = ctx["base"], ctx["device"]
    say = lambda text: print(text, flush=True)  # noqa: E731
    if args.rewordings:
        main_rewordings(ctx, args, say)
        return
    plans = {
        f"user{u}": [
            make_facts(u, args.facts * args.versions)[v * args.facts : (v + 1) * args.facts] for v in range(args.versions)
        ]
        for u in range(args.users)
    }
    runs = [(DEFAULT, list(plans))]
    if args.ablation:
        runs += [(name, list(plans)[: args.ablation_users]) for name in VARIANTS if name != DEFAULT]
    started = time.time()
    results = {}
    for name, users in runs:
        training, replay = VARIANTS[name]
        say(f"{name} ({len(users)} user(s)):")
        rows = [r for user in users for r in run_user(ctx, f"{user}-{len(results)}", plans[user], training, replay, say)]
        results[name] = {"users": len(users), "rows": rows, "summary": summary(rows)}
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "device": str(device),
        "base_model": base.model_id,
        "users": args.users,
        "versions": args.versions,
        "facts_per_version": args.facts,
        "wall_seconds": round(time.time() - started),
        "variants": results,
    }
    args.out.write_text(json.dumps(report, indent=2))
    say(
        f"\n{report['date']}, {report['machine']}, {report['device']}; {args.users} user(s) x {args.versions} versions x "
        f"{args.facts} facts; {report['wall_seconds']} s"
    )
    say("| variant | users | facts learned | retention | forgetting | train s (mean / max) | promoted |")
    say("| --- | --- | --- | --- | --- | --- | --- |")
    for name, result in results.items():
        s = result["summary"]
        say(
            f"| {name} | {result['users']} | {s['facts_learned']} | {s['retention']} | {s['forgetting']} | "
            f"{s['train_seconds']} / {s['max_train_seconds']} | {s['promoted']}/{s['versions']} |"
        )


def main_rewordings(ctx: dict, args, say) -> None:
    started = time.time()
    results = rewording_benchmark(ctx, say, tuple(args.arms.split(",")))
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "device": str(ctx["device"]),
        "base_model": ctx["base"].model_id,
        "wall_seconds": round(time.time() - started),
        "variants": results,
    }
    out = args.out.with_name(args.out.name.replace("learning-", "rewordings-"))
    out.write_text(json.dumps(report, indent=2))
    say(f"\n{report['date']}, {report['machine']}, {report['device']}; {report['wall_seconds']} s")
    say(
        "| augmentation | hand-written rewordings answered | as served | held-out learned | retention "
        "| train s (mean / max) | s per version (all) | promoted |"
    )
    say("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        say(
            f"| {name} | {r['answered']} | {r['answered_as_served']} | {r['held_out_learned']} | {r['retention']} "
            f"| {r['train_seconds']} / {r['max_train_seconds']} | {r['version_seconds']} | {r['promoted']}/4 |"
        )


if __name__ == "__main__":
    main()
