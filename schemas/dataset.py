"""Datasets: the JSONL line format, the held-out split and the manifest beside each snapshot.

The streams side writes datasets, the trainer reads them, and `adaptloop
train` splits a file the same way, so the rules live here, once:

- a dataset is JSONL, one `TrainingExample` per line (`to_jsonl` / `from_jsonl`);
- the held-out split (`split_holdout`): for each taught item that has several
  prompts (the examples sharing an event_id, else the same response), one
  paraphrase (never the original wording) is held out, so validation asks
  about something taught, in words never trained on; of the rated answers, a
  share of the liked and of the disliked (the gate's preference pairs);
- every snapshot has a `DatasetManifest` (counts, lineage, trigger).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from pydantic import Field

from schemas.common import Message, Timestamp, UserId, utc_now
from schemas.training import OffsetRange, TrainingExample


def to_jsonl(examples: Iterable[TrainingExample]) -> bytes:
    return b"".join(e.model_dump_json(exclude_none=True).encode() + b"\n" for e in examples)


def from_jsonl(data: bytes) -> list[TrainingExample]:
    return [TrainingExample.model_validate_json(line) for line in data.splitlines() if line.strip()]


def rank(seed: int, *parts: str) -> str:
    """A deterministic sort key: the same seed and parts always rank the same."""
    return hashlib.sha256("\x1f".join((str(seed), *parts)).encode()).hexdigest()


def example_pair(example: TrainingExample) -> tuple[str, str]:
    """What makes two examples the same: the prompt (ignoring case) and the response."""
    return example.prompt.strip().casefold(), example.response.strip()


# Of a user's rated answers, this share of the liked and of the disliked is held out (a gate judges preference on them).
RATED_HOLDOUT = 0.25


def _held_out_ratings(examples: list[TrainingExample], seed: int) -> set[int]:
    """A deterministic share of the liked and of the disliked rated answers, when each side has at least 3."""
    held: set[int] = set()
    for liked in (True, False):
        side = [i for i, e in enumerate(examples) if e.rated_answer and e.rating and (e.rating > 0) == liked]
        if len(side) >= 3:
            side.sort(key=lambda i: rank(seed, "rated", examples[i].prompt, examples[i].response))
            held.update(side[: max(1, int(len(side) * RATED_HOLDOUT))])
    return held


def split_holdout(examples: list[TrainingExample], seed: int) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """(train, test): one paraphrase of every multi-prompt item is held out; order is kept.

    Where the paraphrases say their kind of rewording (`wording`: contraction,
    name, synonym, ...; not the templates), the held-out one is of a kind the
    item is then never trained on (its other rewordings of that kind are
    dropped), so the check measures words the model has not seen in that way.
    """
    groups: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        if example.rated_answer:
            continue  # held out by `_held_out_ratings`
        groups.setdefault(example.event_id or f"response:{example.response}", []).append(i)
    held: set[int] = set()
    dropped: set[int] = set()
    for members in groups.values():
        original = examples[members[0]]  # the first member is the original wording; hold out one of the others
        candidates = [i for i in members[1:] if examples[i].prompt != original.prompt]
        kinds = sorted({examples[i].wording for i in candidates} - {None, "template"})  # type: ignore[type-var]
        if kinds:
            kind = min(kinds, key=lambda k: rank(seed, "kind", original.prompt, str(k)))
            of_kind = [i for i in candidates if examples[i].wording == kind]
            held.add(min(of_kind, key=lambda i: rank(seed, examples[i].prompt)))
            dropped.update(of_kind)
        elif candidates:
            as_taught = [i for i in candidates if examples[i].response == original.response] or candidates
            held.add(min(as_taught, key=lambda i: rank(seed, examples[i].prompt)))
    held |= _held_out_ratings(examples, seed)
    test = [examples[i] for i in sorted(held)]
    test_pairs = {example_pair(e) for e in test}
    test_prompts = {e.prompt.strip().casefold() for e in test if not e.rated_answer}
    train = [
        e
        for i, e in enumerate(examples)
        if i not in held | dropped and example_pair(e) not in test_pairs and e.prompt.strip().casefold() not in test_prompts
    ]
    return train, test


class DatasetManifest(Message):
    """`<sha256>.manifest.json` beside a dataset snapshot: what it holds and where it came from."""

    user_id: UserId
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    test_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    train_count: int = Field(ge=0)
    test_count: int = Field(ge=0)
    example_counts: dict[str, int] = Field(default_factory=dict, description="training examples per source")
    trigger: str
    lineage: list[OffsetRange] = Field(default_factory=list)
    created_at: Timestamp = Field(default_factory=utc_now)
