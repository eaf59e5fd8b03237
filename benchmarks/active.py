"""Active learning: a labelling budget spent on the questions the worker picks, against random ones.

    .venv/bin/python benchmarks/active.py [--budget 5] [--random-draws 3]
    (or: make bench-active)

A synthetic user has 20 questions about themselves (personal facts the base
model cannot know), asked at very different frequencies (Zipf, exponent
1.2). 200 questions drawn with those frequencies reach the worker's own
processor (streams/processor.py, as missed intents without a resolution);
with `daily_budget` 5 it opens 5 labelling tasks (streams/active.py).

- active: the 5 questions the worker asked about, answered by corrections
  carrying their `review_request_id`, curated by the same processor into a
  dataset, and trained into an adapter on the default model (the trainer's
  job runner, without the gate: what is compared is what was learned);
- random (the baseline, in the same run): 5 questions drawn at random from
  the 20, answered and trained the same way; `--random-draws` draws, mean.

Measured: the share of the user's next 200 questions (drawn with the same
frequencies, another seed) that the adapter answers right (the answer names
the fact's key terms, as the gate's match does). Goal: active >= 1.5x random.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.host import machine  # noqa: E402

FACTS = [
    ("What is my locker code?", "Your locker code is 4417."),
    ("Which gate does my usual flight leave from?", "Your usual flight leaves from gate B22."),
    ("What is my dog's name?", "Your dog is called Biscuit."),
    ("Where was I born?", "You were born in Tromsø."),
    ("What is my employee number?", "Your employee number is 48213."),
    ("Which football team do I support?", "You support Hibernian FC."),
    ("What is my favourite programming language?", "Your favourite language is OCaml."),
    ("What is my manager's name?", "Your manager is Priya Natarajan."),
    ("What car do I drive?", "You drive a Volvo V70."),
    ("What is my cat's name?", "Your cat is called Pixel."),
    ("Which city do I live in?", "You live in Dundee."),
    ("What is my library card number?", "Your library card number is 55190."),
    ("What did I name my boat?", "Your boat is called Sea Wren."),
    ("What is my desk number?", "Your desk number is 7312."),
    ("What is my gym locker number?", "Your gym locker number is 312."),
    ("What is my sister's name?", "Your sister is called Ingrid."),
    ("What is my wifi network called?", "Your wifi network is called Heron."),
    ("Which bus do I take to work?", "You take the number 38 bus."),
    ("What is my bank's name?", "Your bank is Nordlys Sparebank."),
    ("What is my grandmother's name?", "Your grandmother is called Solveig."),
]
ZIPF = 1.2
T0 = 1_780_000_000.0


def weights() -> list[float]:
    return [1 / (rank + 1) ** ZIPF for rank in range(len(FACTS))]


def draw(n: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(len(FACTS)), weights=weights(), k=n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=5)
    parser.add_argument("--random-draws", type=int, default=3)
    parser.add_argument("--asked", type=int, default=200, help="questions before the labels (and after, for the measure)")
    args = parser.parse_args()

    from core.settings import load_settings

    settings = load_settings()
    history, future = draw(args.asked, seed=1), Counter(draw(args.asked, seed=2))
    with tempfile.TemporaryDirectory(prefix="adaptloop-bench-active-") as tmp:
        chosen = asked_by_the_worker(settings, history, args.budget, Path(tmp) / "worker")
        trainer = Trainer(settings, Path(tmp) / "store")
        runs = {"active": chosen}
        for n in range(args.random_draws):
            runs[f"random-{n + 1}"] = sorted(random.Random(100 + n).sample(range(len(FACTS)), args.budget))
        base_right = trainer.answered_right(None)
        results = {name: trainer.measure(name, picks, future, args.asked) for name, picks in runs.items()}
    randoms = [r["share_answered"] for name, r in results.items() if name.startswith("random")]
    summary = {
        "benchmark": "active",
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{machine()}, Python {platform.python_version()}",
        "budget": args.budget,
        "zipf_exponent": ZIPF,
        "asked_before": dict(sorted(Counter(history).items())),
        "asked_after": dict(sorted(future.items())),
        "base_model_share": round(sum(future[i] for i in base_right) / args.asked, 4),
        "runs": results,
        "random_mean_share": round(statistics.mean(randoms), 4),
        "active_over_random": round(results["active"]["share_answered"] / max(statistics.mean(randoms), 1e-9), 2),
    }
    out = REPO / "benchmarks" / "results" / f"active-{summary['date']}.json"
    out.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("asked_before", "asked_after")}, indent=2))
    print(f"written to {out.relative_to(REPO)}")


def asked_by_the_worker(settings, history: list[int], budget: int, root: Path) -> list[int]:
    """The questions the worker's processor opens labelling tasks for, after the user asked `history`."""
    from dataclasses import replace

    from core.storage import ArtifactStore
    from schemas import ReviewRequest
    from streams.envelope import Envelope
    from streams.processor import BatchStats, ProcessorConfig, UserProcessor
    from streams.state import MemoryUserLog, UserState

    cfg = ProcessorConfig.from_settings(settings)
    cfg = replace(cfg, active=cfg.active.model_copy(update={"daily_budget": budget}))
    processor = UserProcessor(cfg, ArtifactStore(str(root)))
    envelopes = [
        Envelope(
            k="event",
            kind="intent_traces",
            body={
                "event_id": f"ask-{n}",
                "user_id": "sam",
                "timestamp": datetime.fromtimestamp(T0 + 60 * n, UTC).isoformat(),
                "intent": "personal_fact",
                "status": "missed",
                "query": FACTS[fact][0],
            },
        )
        for n, fact in enumerate(history)
    ]
    out = processor.handle("sam", UserState(), MemoryUserLog(), envelopes, BatchStats())
    questions = [m.question for m in out if isinstance(m, ReviewRequest) and m.status == "open"]
    return sorted(next(i for i, (q, _) in enumerate(FACTS) if q == question) for question in questions)


class Trainer:
    """The default model, kept loaded; each run trains one adapter from the answered questions and measures it."""

    def __init__(self, settings, store: Path) -> None:
        from trainer.job import runner_from_settings
        from trainer.model import load_base, resolve_base_model

        self.settings = settings.model_copy(update={"storage_root": str(store)})
        base = resolve_base_model(settings.model.base_model, settings.model.gguf_file, settings.cache_dir)
        self.model, self.tokenizer, self.device = load_base(base, settings.model.dtype)
        self.runner = runner_from_settings(self.settings, base, self.model, self.tokenizer, self.device, with_gate=False)

    def measure(self, name: str, picks: list[int], future: Counter, asked: int) -> dict:
        from trainer.job import JobHooks, TrainingJob

        train, test = self.dataset(name, picks)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="adaptloop-bench-job-") as work:
            outcome = self.runner.run(TrainingJob(name, train, test, f"bench://{name}", name), Path(work), JobHooks())
        seconds = time.perf_counter() - started
        right = self.answered_right(outcome.info.path)
        share = sum(future[i] for i in right) / asked
        print(f"{name}: labels {picks}, answered right {sorted(right)}, share {share:.3f} ({seconds:.0f} s)", flush=True)
        return {
            "labelled": [FACTS[i][0] for i in picks],
            "answered_right": [FACTS[i][0] for i in sorted(right)],
            "share_answered": round(share, 4),
            "labels_share_of_questions": round(sum(future[i] for i in picks) / asked, 4),
            "train_seconds": round(seconds, 1),
        }

    def dataset(self, name: str, picks: list[int]):
        """The answers as corrections, curated by the worker's processor (paraphrases, the held-out split)."""
        from core.storage import ArtifactStore
        from streams.envelope import Envelope
        from streams.processor import BatchStats, ProcessorConfig, UserProcessor
        from streams.state import MemoryUserLog, UserState

        processor = UserProcessor(ProcessorConfig.from_settings(self.settings), ArtifactStore(self.settings.storage_root))
        state, log = UserState(), MemoryUserLog()
        envelopes = [
            Envelope(
                k="event",
                kind="feedback",
                body={
                    "event_id": f"{name}-label-{i}",
                    "user_id": name,
                    "timestamp": datetime.fromtimestamp(T0 + i, UTC).isoformat(),
                    "kind": "correction",
                    "query": FACTS[i][0],
                    "response": "I don't know.",
                    "correction": FACTS[i][1],
                },
            )
            for i in picks
        ]
        processor.handle(name, state, log, envelopes, BatchStats())
        train, test, _ = processor.dataset_for(name, state, log, include_global=False)
        return train, test

    def answered_right(self, adapter_dir: Path | None) -> set[int]:
        """The facts the base model with the adapter (or alone) answers right."""
        from peft import PeftModel

        from trainer.generation import generate_batch
        from trainer.scoring import answers_match

        prompts = [q for q, _ in FACTS]
        if adapter_dir is None:
            answers = generate_batch(self.model, self.tokenizer, self.device, prompts)
        else:
            adapted = PeftModel.from_pretrained(self.model, str(adapter_dir))
            try:
                answers = generate_batch(adapted, self.tokenizer, self.device, prompts)
            finally:
                adapted.unload()
        return {i for i, (answer, (_, fact)) in enumerate(zip(answers, FACTS)) if answers_match(answer, fact)}


if __name__ == "__main__":
    main()
