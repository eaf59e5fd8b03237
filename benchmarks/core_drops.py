"""Where the gate's core-suite drops come from: per core prompt, how often candidates lose it.

    .venv/bin/python benchmarks/core_drops.py /tmp/adaptloop-scale-k8-*/       # registries the scale benchmark left
    .venv/bin/python benchmarks/core_drops.py REGISTRY... [--top 12] [--drop 0.1]

Reads each registry's gate records (`adapter_validation_results.jsonl`, the
candidate's and the base model's answer and score for every core case) and
prints: how many core cases a candidate loses (its score down by more than
--drop) and gains, which prompts are lost and how often, the share of the
summed core-score change those prompts make, where each one's expected
answer sits in the base model's own answer, and the rejections' reasons.
No model is loaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path


def gate_records(registries: list[Path]) -> list[dict]:
    """Every gate record under the registries (any depth), in file order."""
    records = []
    for registry in registries:
        for path in sorted(Path(registry).rglob("adapter_validation_results.jsonl")):
            records += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return records


def core_changes(record: dict) -> dict[str, float]:
    """Per core prompt: the candidate's score minus the base model's."""
    return {c["prompt"]: c["score"] - c["before_score"] for c in record["suites"]["core"]["case_scores"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("registries", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=12, help="prompts listed")
    parser.add_argument("--drop", type=float, default=0.1, help="a case is lost when its score falls by more than this")
    args = parser.parse_args()
    records = [r for r in gate_records(args.registries) if "core" in r.get("suites", {})]
    if not records:
        raise SystemExit("no gate records with a core suite under " + ", ".join(map(str, args.registries)))
    changes = [core_changes(r) for r in records]
    lost = Counter(p for ch in changes for p, d in ch.items() if d < -args.drop)
    per_candidate = [sum(d < -args.drop for d in ch.values()) for ch in changes]
    gained = sum(d > args.drop for ch in changes for d in ch.values())
    top = dict(lost.most_common(args.top))
    total = sum(sum(ch.values()) for ch in changes)
    from_top = sum(d for ch in changes for p, d in ch.items() if p in top)
    print(f"{len(records)} candidates, {len(changes[0])} core cases each")
    print(
        f"cases lost per candidate: mean {statistics.mean(per_candidate):.2f}, most {max(per_candidate)}; cases gained: {gained} in all"
    )
    print(f"the {len(top)} prompts below make {from_top / total:.0%} of the summed core-score change")
    base = {c["prompt"]: c for c in records[0]["suites"]["core"]["case_scores"]}
    print("\n| prompt | candidates that lose it | expected answer at | base model's score |\n| --- | ---: | ---: | ---: |")
    for prompt, count in top.items():
        case = base[prompt]
        at = case["before"].casefold().find(case["expected"].casefold())
        where = f"char {at} of {len(case['before'])}" if at >= 0 else "not verbatim"
        print(f"| {prompt} | {count} ({count / len(records):.0%}) | {where} | {case['before_score']:.2f} |")
    rejected = [r for r in records if not r.get("passed", True)]
    kinds = Counter(reason.split(":")[0] for r in rejected for reason in r.get("reasons", []))
    print(f"\nrejected: {len(rejected)} of {len(records)}; reasons: {dict(kinds)}")


if __name__ == "__main__":
    main()
