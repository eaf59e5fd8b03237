"""The general-knowledge contradiction check (trainer/contradictions.py) on a labelled set, on the default model.

    .venv/bin/python benchmarks/contradictions.py [--threshold 0.5]
    (or: make bench-contradictions)

The set, benchmarks/data/contradictions.jsonl, was written by hand for this
measure and never used to tune the check: 60 training examples, each
labelled `contradiction` or `none`, of four kinds:

- personal (20): a user's own facts ("What is my dog's name?" -> "Biscuit");
- context (10): facts of the user's world with no pronoun at all ("When is
  the team standup?" -> "9:15"), which only the base model's lack of
  confidence keeps from being flagged;
- general, agrees (15): world facts taught as the base model would answer,
  in other words ("Paris is the capital of France.");
- general, contradicts (15): the same questions taught a false answer
  ("The capital of France is Tromsø.").

Each example is judged alone, as if it were the only one a candidate was
taught. Reported: precision and recall of `contradiction`, each kind's
share flagged, and the seconds the check took; with --threshold the
confidence the check needs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.host import machine  # noqa: E402

DATA = REPO / "benchmarks" / "data" / "contradictions.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threshold", type=float, default=None, help="default: validation.contradiction_confidence")
    args = parser.parse_args()

    from core.settings import load_settings
    from trainer.contradictions import about_the_user, base_answers, judge
    from trainer.model import load_base, resolve_base_model
    from trainer.scoring import TestCase

    settings = load_settings()
    threshold = args.threshold if args.threshold is not None else settings.validation.contradiction_confidence
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    base = resolve_base_model(settings.model.base_model, settings.model.gguf_file, settings.cache_dir)
    model, tokenizer, device = load_base(base, settings.model.dtype)
    started = time.perf_counter()
    general = [r for r in rows if not about_the_user(r["prompt"], r["answer"])]
    answers = dict(zip((r["prompt"] for r in general), base_answers(model, tokenizer, device, [r["prompt"] for r in general])))
    seconds = time.perf_counter() - started
    for row in rows:
        found = None
        if row["prompt"] in answers:
            found = judge(TestCase(row["prompt"], row["answer"]), answers[row["prompt"]], threshold)
        row["flagged"] = found is not None
        row["about_the_user"] = row["prompt"] not in answers
        base_answer = answers.get(row["prompt"])
        row["base"] = (
            None
            if base_answer is None
            else {"sentence": base_answer.sentence, "fact": base_answer.fact, "confidence": round(base_answer.confidence, 3)}
        )
    print(json.dumps(_summary(rows, threshold, seconds), indent=2))


def _summary(rows: list[dict], threshold: float, seconds: float) -> dict:
    flagged = [r for r in rows if r["flagged"]]
    true = [r for r in flagged if r["label"] == "contradiction"]
    wanted = [r for r in rows if r["label"] == "contradiction"]
    kinds = sorted({r["kind"] for r in rows})
    summary = {
        "benchmark": "contradictions",
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{machine()}, Python {platform.python_version()}",
        "threshold": threshold,
        "examples": len(rows),
        "precision": round(len(true) / len(flagged), 3) if flagged else None,
        "recall": round(len(true) / len(wanted), 3) if wanted else None,
        "flagged_by_kind": {
            k: f"{sum(r['flagged'] for r in rows if r['kind'] == k)}/{sum(r['kind'] == k for r in rows)}" for k in kinds
        },
        "personal_rule": f"{sum(r['about_the_user'] for r in rows if r['kind'] == 'personal')}/20 personal examples told apart by words alone",
        "check_seconds": round(seconds, 2),
        "rows": rows,
    }
    out = REPO / "benchmarks" / "results" / f"contradictions-{summary['date']}.json"
    out.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {k: v for k, v in summary.items() if k != "rows"} | {
        "missed": [r["answer"] for r in wanted if not r["flagged"]],
        "false_alarms": [r["answer"] for r in flagged if r["label"] != "contradiction"],
        "results": str(out.relative_to(REPO)),
    }


if __name__ == "__main__":
    main()
