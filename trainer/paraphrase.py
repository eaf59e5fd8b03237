"""Paraphrases of a taught question written by the base model: a few-shot chat, filtered by sentence embedding.

    paraphraser = Paraphraser.on_model(model, tokenizer, device, load_embedder().similarity, count=2, seed=0)
    paraphraser.augment(examples, held_out)
    -> the examples, each taught question followed by up to 2 copies asked in the model's words (wording "model")

The rules in streams/rewording.py know the forms they were written for
("What is" -> "What's", "city" -> "town"); a person asks in forms nobody
wrote a rule for. The base model has read many: shown a few questions and
their rewrites as earlier chat turns, it rewrites the taught question too.
A 135M model often misreads the task (it answers, repeats, or rewrites one
of the examples), so its rewrites pass filters before they are trained on:

- one line, a question, in the asker's person (a "your"/"you" rewrite of a
  "my"/"I" question is turned back, or dropped when that is not clear);
- close in meaning: sentence-embedding similarity to the taught question at
  least `min_similarity` (a rewrite of the wrong question falls below);
- new: not a question the dataset already asks, nor one already chosen;
- never a held-out question: no rewrite as close to a held-out question as
  `leak_similarity` (so the held-out check still measures words not trained on).

Greedy decoding, and each of a question's few-shot prompts draws its examples
by a seeded rank: the same model, question and seed give the same paraphrases.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from schemas.dataset import rank
from schemas.training import TrainingExample
from trainer.scoring import normal_words

# Rewrites of questions unlike the benchmarks' (benchmarks/data/rewordings.jsonl is never used for tuning).
SHOTS = [
    ("What is my daughter's school called?", "Which school does my daughter go to?"),
    ("When is my wedding anniversary?", "On what date did I get married?"),
    ("Where do I keep my spare key?", "Where is my spare key hidden?"),
    ("What is my partner's job?", "What does my partner do for a living?"),
    ("How many siblings do I have?", "How many brothers and sisters do I have?"),
    ("What is my doctor's phone number?", "Which number reaches my doctor?"),
    ("What time does my train leave?", "When is my train departing?"),
]
SYSTEM = "You rewrite questions in other words. The meaning stays the same. Answer with the rewritten question only."
SHOTS_PER_PROMPT = 3
MAX_NEW_TOKENS = 32
# What a paraphrase is made from: the questions a person taught, not their copies (templates, rules) or replays.
_TAUGHT = {"correction", "intent", "concept", "conversation", "manual"}
_SECOND_PERSON = [
    (r"\b(do|did|can|could|will|would|have|had|should)\s+you\b", r"\1 I"),
    (r"\bare you\b", "am I"),
    (r"\bwere you\b", "was I"),
    (r"\byou are\b", "I am"),
    (r"\byou're\b", "I'm"),
    (r"\byou've\b", "I've"),
    (r"\byours\b", "mine"),
    (r"\byour\b", "my"),
    (r"^you\b", "I"),
]
_FIRST_PERSON = re.compile(r"\b(I|my|me|mine|I'm|I've)\b")


def _words(text: str) -> tuple[str, ...]:
    """What tells two questions apart: their words as the gate's matching compares them (case, punctuation aside)."""
    return tuple(normal_words(text))


def in_asker_person(question: str, rewrite: str) -> str | None:
    """`rewrite` in the person `question` is asked in ("What is your cat's name?" for "my cat" -> "my"); None when a
    "you" is left that no rule turns back."""
    if not _FIRST_PERSON.search(question) or re.search(r"\byou", question, re.IGNORECASE):
        return rewrite
    for pattern, replacement in _SECOND_PERSON:
        rewrite = re.sub(pattern, replacement, rewrite, flags=re.IGNORECASE)
    rewrite = rewrite[:1].upper() + rewrite[1:]
    return None if re.search(r"\byou", rewrite, re.IGNORECASE) else rewrite


def cleaned(question: str, written: str) -> str | None:
    """The model's rewrite as a question in the asker's person, or None: its first line, a question of 3-40 words."""
    line = written.strip().splitlines()[0] if written.strip() else ""
    line = re.sub(r"^\s*(rewritten|rewrite|question)\s*:", "", line, flags=re.IGNORECASE).strip().strip("\"'")
    if not line.endswith("?") or not 3 <= len(line.split()) <= 40:
        return None
    return in_asker_person(question, line)


def few_shot_messages(question: str, seed: int, variant: int) -> list[dict[str, str]]:
    """A chat whose earlier turns rewrite `SHOTS_PER_PROMPT` example questions (chosen by a seeded rank), ending
    with the question to rewrite."""
    shots = sorted(SHOTS, key=lambda shot: rank(seed, question, str(variant), shot[0]))[:SHOTS_PER_PROMPT]
    messages = [{"role": "system", "content": SYSTEM}]
    for asked, rewritten in shots:
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": rewritten}]
    return messages + [{"role": "user", "content": question}]


@dataclass(frozen=True)
class ParaphraseFilter:
    """What a written paraphrase must be to be trained on (the module docstring's list)."""

    min_similarity: float = 0.8
    leak_similarity: float = 0.97


class Paraphraser:
    """Writes paraphrases of taught questions with the base model, keeps those the filter passes."""

    def __init__(
        self,
        write: Callable[[list[list[dict[str, str]]]], list[str]],
        similarity: Callable[[list[str], list[str]], list[float]],
        count: int,
        seed: int,
        keep: ParaphraseFilter = ParaphraseFilter(),
    ) -> None:
        self.write, self.similarity, self.count, self.seed, self.keep = write, similarity, count, seed, keep

    @classmethod
    def on_model(cls, model, tokenizer, device, similarity, count: int, seed: int, keep: ParaphraseFilter = ParaphraseFilter()):
        """A paraphraser that writes with `model` (greedy, batched) and compares by `similarity` (an embedder's,
        trainer/scoring.py)."""
        from trainer.generation import generate_chats

        def write(chats: list[list[dict[str, str]]]) -> list[str]:
            return generate_chats(model, tokenizer, device, chats, MAX_NEW_TOKENS)

        return cls(write, similarity, count, seed, keep)

    def paraphrases(self, questions: list[str], avoid: list[str], held_out: list[str]) -> dict[str, list[str]]:
        """Up to `count` paraphrases per question, none of them in `avoid` or near a `held_out` question."""
        questions = list(dict.fromkeys(questions))
        if self.count <= 0 or not questions:
            return {}
        variants = 2 * self.count  # a 135M model's rewrites fail the filter about half the time
        chats = [few_shot_messages(q, self.seed, v) for q in questions for v in range(variants)]
        written = self.write(chats)
        candidates = [(q, cleaned(q, text)) for q, text in zip((q for q in questions for _ in range(variants)), written)]
        pairs = [(q, text) for q, text in candidates if text is not None]
        if not pairs:
            return {}
        close = self.similarity([t for _, t in pairs], [q for q, _ in pairs])
        taken = {_words(text) for text in [*questions, *avoid, *held_out]}
        chosen: dict[str, list[str]] = {}
        for (question, text), similarity in zip(pairs, close):
            if _words(text) in taken or similarity < self.keep.min_similarity or len(chosen.get(question, [])) >= self.count:
                continue
            if self._near_held_out(text, held_out):
                continue
            taken.add(_words(text))
            chosen.setdefault(question, []).append(text)
        return chosen

    def _near_held_out(self, text: str, held_out: list[str]) -> bool:
        if not held_out:
            return False
        return max(self.similarity([text] * len(held_out), held_out)) >= self.keep.leak_similarity

    def augment(self, examples: list[TrainingExample], held_out: list[TrainingExample]) -> list[TrainingExample]:
        """Each taught question's examples followed by copies asked in the model's words (wording "model")."""
        taught = [e for e in examples if e.wording is None and e.source in _TAUGHT and not e.rated_answer]
        written = self.paraphrases(
            [e.prompt for e in taught], [e.prompt for e in examples], [e.prompt for e in held_out if not e.rated_answer]
        )
        taught_ids = {id(e) for e in taught}
        out: list[TrainingExample] = []
        for example in examples:
            out.append(example)
            if id(example) in taught_ids:
                out += [example.model_copy(update={"prompt": t, "wording": "model"}) for t in written.get(example.prompt, [])]
        return out
