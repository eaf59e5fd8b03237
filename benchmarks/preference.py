"""Preference benchmark: do users who only rate (no corrections) move the model's answers their way?

    .venv/bin/python benchmarks/preference.py          (or: make bench-preference)

Two synthetic users on the default model, through the trainer's own job
(the settings file's training, anchors and gate):

- `short`: rates short direct answers +1 and long ones -1;
- `metric`: rates answers that use metric units +1 and imperial ones -1.

The rated answers are the model's own: several sampled answers to each of
the user's prompts, rated by the user's rule (answers between the two sides
are not rated). The rated answers go through the dataset's held-out split
(a share of each side held out for the gate's preference suite) and are
trained with the preference objective (KTO on rated answers, beside the
anchors' KL), then gated. Measured on held-out prompts (never rated, never
trained on), greedy answers of the base model and of the candidate:

- short: mean answer length in words (goal: at least 30% shorter);
- metric: answers that use metric units (goal: at least 2x as many);
- retention of the core suite (the learning benchmark's goal, >= 95%) and
  the gate's decision.

Ablation: the same users' data with `training.objective: sft` (supervised
fine-tuning on the liked answers alone). Results go to stdout (a Markdown
table) and to --out as JSON; record them in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
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

sys.path.insert(0, str(REPO / "benchmarks"))

from learning import answers_with, loaded_context, runner_for, train_version  # noqa: E402

SHORT_PROMPTS = [
    "How do I boil an egg?",
    "Why is the sky blue?",
    "What is a good way to learn to cook?",
    "How do plants grow?",
    "What should I pack for a weekend trip?",
    "How do I make tea?",
    "Why do cats purr?",
    "What is photosynthesis?",
    "How can I sleep better?",
    "What is the best way to save money?",
    "How do airplanes fly?",
    "What is a black hole?",
    "How do I start running?",
    "Why do leaves change colour in autumn?",
    "What is a healthy breakfast?",
    "How do vaccines work?",
    "What is inflation?",
    "How do I write a good email?",
    "Why is exercise important?",
    "How do bees make honey?",
    "What causes rain?",
    "How do I care for a houseplant?",
    "What is the internet?",
    "How do I learn a new language?",
]
SHORT_HELD_OUT = [
    "How do I make pancakes?",
    "Why do we dream?",
    "What is gravity?",
    "How do I stay focused while studying?",
    "What is a volcano?",
    "How do I clean a cast iron pan?",
    "Why is the ocean salty?",
    "How do magnets work?",
    "What is a good hobby to start?",
    "How do I plan a budget?",
    "What makes a good friend?",
    "How do rainbows form?",
    "What is a good way to make friends in a new city?",
    "How do I fix a slow computer?",
    "Why do birds migrate?",
    "What is climate change?",
    "How do I bake bread?",
    "Why do we need sleep?",
    "How does a refrigerator work?",
    "What is a healthy lunch?",
    "How do I prepare for a job interview?",
    "Why do onions make you cry?",
    "How do I keep my kitchen clean?",
    "What is democracy?",
]
METRIC_PROMPTS = [
    "How tall is the Eiffel Tower?",
    "How far is it from London to Paris?",
    "How heavy is an adult elephant?",
    "How long is a marathon?",
    "How deep is the Pacific Ocean?",
    "How tall is Mount Everest?",
    "What is a normal body temperature?",
    "How long is the Nile river?",
    "How much does a car weigh?",
    "How tall is a giraffe?",
    "How fast can a cheetah run?",
    "How big is the Moon?",
    "How long is a football field?",
    "How much water should I drink a day?",
    "How far away is the Moon?",
    "How heavy is a blue whale?",
    "How tall is the Statue of Liberty?",
    "How long is the Great Wall of China?",
    "How hot is the surface of the Sun?",
    "How long is an Olympic swimming pool?",
    "How much does a newborn baby weigh?",
    "How high do planes fly?",
    "How wide is the Atlantic Ocean?",
    "How tall is an average man?",
]
METRIC_HELD_OUT = [
    "How tall is the Empire State Building?",
    "How far is it from New York to Boston?",
    "How heavy is a grizzly bear?",
    "How long is the Amazon river?",
    "How deep is Lake Baikal?",
    "How tall is Big Ben?",
    "How fast does sound travel?",
    "How long is the Golden Gate Bridge?",
    "How heavy is a horse?",
    "How high is Mount Kilimanjaro?",
    "How big is Texas?",
    "How far can a person walk in a day?",
]
_METRIC = re.compile(
    r"\b(\d[\d,.]*\s*(km|m|cm|mm|kg|g|l|ml)\b|kilomet|metre|meter|centimet|millimet|kilogram|gram|litre|liter|celsius|°c)", re.I
)
_IMPERIAL = re.compile(r"\b(mile|feet|foot|inch|pound|lbs?\b|ounce|oz\b|yard|gallon|fahrenheit|°f|mph)", re.I)


def uses_metric(text: str) -> bool:
    return bool(_METRIC.search(text))


def uses_imperial(text: str) -> bool:
    return bool(_IMPERIAL.search(text))


def words(text: str) -> int:
    return len(text.split())


def rate_short(answers: list[tuple[str, str]]) -> list[tuple[str, str, float]]:
    """+1 for the shortest third of the answers (by words), -1 for the longest third."""
    lengths = sorted(words(a) for _, a in answers)
    low, high = lengths[len(lengths) // 3], lengths[2 * len(lengths) // 3]
    return [(p, a, 1.0 if words(a) <= low else -1.0) for p, a in answers if words(a) <= low or words(a) > high]


def rate_metric(answers: list[tuple[str, str]]) -> list[tuple[str, str, float]]:
    """+1 for an answer in metric units (and none imperial), -1 for one in imperial units (and none metric)."""
    out = []
    for p, a in answers:
        metric, imperial = uses_metric(a), uses_imperial(a)
        if metric != imperial:
            out.append((p, a, 1.0 if metric else -1.0))
    return out


OBJECTIVES = ("sft+preference", "sft")  # the preference objective, then the ablation: SFT on the liked answers
USERS = {
    "short": (SHORT_PROMPTS, SHORT_HELD_OUT, rate_short),
    "metric": (METRIC_PROMPTS, METRIC_HELD_OUT, rate_metric),
}


def sampled_answers(ctx: dict, prompts: list[str], samples: int, max_new_tokens: int, seed: int) -> list[tuple[str, str]]:
    """`samples` sampled answers of the base model to each prompt (temperature 1, top-p 0.95)."""
    import torch

    model, tokenizer, device = ctx["model"], ctx["tokenizer"], ctx["device"]
    torch.manual_seed(seed)
    out = []
    tokenizer.padding_side = "left"
    for start in range(0, len(prompts), 8):
        chunk = prompts[start : start + 8]
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in chunk
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            generated = model.generate(
                **batch,
                do_sample=True,
                temperature=1.0,
                top_p=0.95,
                max_new_tokens=max_new_tokens,
                num_return_sequences=samples,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        answers = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        out += [(chunk[i // samples], answers[i].strip()) for i in range(len(answers))]
    return [(p, a) for p, a in out if a]


def measure(user: str, answers: list[str]) -> dict:
    if user == "short":
        return {"mean_words": round(statistics.mean(words(a) for a in answers), 1)}
    metric = sum(uses_metric(a) and not uses_imperial(a) for a in answers)
    imperial = sum(uses_imperial(a) and not uses_metric(a) for a in answers)
    return {"metric_answers": metric, "imperial_answers": imperial}  # in those units alone, as the user rates them


def run(
    ctx: dict, user: str, rated: list[tuple[str, str, float]], objective: str, seed: int, held_out: list[str], args, say
) -> dict:
    """One version trained on the user's rated answers under `objective` (and `training.seed`), gated, measured on
    the held-out prompts."""
    from schemas.dataset import split_holdout
    from schemas.training import TrainingExample

    examples = [
        TrainingExample(prompt=p, response=a, source="rating", rating=r, event_id=f"{user}-{n}")
        for n, (p, a, r) in enumerate(rated)
    ]
    train, test = split_holdout(examples, seed=0)
    cfg = replace(ctx["train_cfg"], objective=objective, seed=seed)
    runner = runner_for(ctx, ctx["root"] / f"{user}-{objective}-{seed}", cfg)
    outcome = train_version(runner, user, train, test)
    answers = answers_with(ctx, outcome.info.path, held_out, args.max_new_tokens)
    m = outcome.info.manifest.metrics
    row = {
        "user": user,
        "objective": objective,
        "seed": seed,
        "rated": len(rated),
        "liked": sum(r > 0 for _, _, r in rated),
        "train_examples": len(train),
        **measure(user, answers),
        "preference_score": m.preference_score,
        "retention": m.retention,
        "core_score": m.core_score,  # against the reference's core_reference_score (the gate's allowed drop)
        "core_reference_score": m.core_reference_score,
        "train_seconds": m.train_seconds,
        "gate_seconds": m.gate_seconds,
        "decision": outcome.decision,
        "update_scaled": outcome.info.manifest.early_stopping.update_scaled,  # < 1: a drift retry's smaller update
        "reasons": outcome.report.reasons if outcome.report is not None else [],
        "answers": answers,
    }
    run_name = f"{user} / {objective} / seed {seed}"
    say(f"  {run_name}: {measure(user, answers)}, retention {m.retention}, {m.train_seconds:.0f}s, {outcome.decision}")
    return row


def main() -> None:

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=4, help="sampled answers per prompt")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        help="for the sampled answers and the held-out ones (default: the server's, serving.default_max_tokens)",
    )
    parser.add_argument("--users", nargs="+", default=list(USERS), choices=list(USERS))
    parser.add_argument(
        "--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES), help="the run and its ablation"
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, help="training seeds, one version each (default: the settings' training.seed)"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / f"preference-{datetime.now(UTC):%Y-%m-%d}.json"
    )
    args = parser.parse_args()
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("adaptloop.trainer").setLevel(logging.INFO)
    ctx = {**loaded_context(), "root": Path(tempfile.mkdtemp(prefix="adaptloop-bench-preference-"))}
    # Answers as long as the server gives them: a shorter limit cuts most of the base model's answers (7 of the 12
    # first held-out ones at 160 tokens), which hides a candidate's shortening from the length measure.
    if args.max_new_tokens is None:
        args.max_new_tokens = ctx["settings"].serving.default_max_tokens  # the server's, when a request names none
    say = lambda text: print(text, flush=True)  # noqa: E731
    started = time.time()
    results = {}
    seeds = args.seeds or [ctx["train_cfg"].seed]
    for user in args.users:
        prompts, held_out, rate = USERS[user]
        rated = rate(sampled_answers(ctx, prompts, args.samples, args.max_new_tokens, seed=1))
        base = measure(user, answers_with(ctx, None, held_out, args.max_new_tokens))
        say(f"{user}: {len(rated)} rated answers ({sum(r > 0 for *_, r in rated)} liked); base model on held-out prompts: {base}")
        rows = [run(ctx, user, rated, o, seed, held_out, args, say) for o in args.objectives for seed in seeds]
        results[user] = {"base": base, "rows": rows}
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "device": str(ctx["device"]),
        "base_model": ctx["base"].model_id,
        "samples_per_prompt": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "wall_seconds": round(time.time() - started),
        "users": results,
    }
    args.out.write_text(json.dumps(report, indent=2))
    say(f"\n{report['date']}, {report['machine']}, {report['device']}; {report['wall_seconds']} s")
    say(
        "| user | objective | seed | held-out answers (base -> trained) | change | preference acc. | retention | train s |"
        " decision |"
    )
    say("| --- | --- | ---: | --- | --- | --- | --- | --- | --- |")
    for user, result in results.items():
        key = "mean_words" if user == "short" else "metric_answers"
        for row in result["rows"]:
            before, after = result["base"][key], row[key]
            change = f"{after / before - 1:+.0%}" if user == "short" else f"{after / max(before, 1):.2f}x"
            say(
                f"| {user} | {row['objective']} | {row['seed']} | {key} {before} -> {after} | {change} | "
                f"{row['preference_score']} | {row['retention']} | {row['train_seconds']} | {row['decision']} |"
            )


if __name__ == "__main__":
    main()
