"""Training examples that contradict what the base model knows well about the world.

A correction usually teaches a user's own facts ("What is my dog's name?" ->
"Biscuit"): nothing the base model could know, nothing to contradict. An
example that gives a general question another answer than the one the base
model gives with high confidence ("What is the capital of France?" ->
"Tromsø") is something else: a mistake, a joke or poisoning. The gate finds
such examples (`general_contradictions`) and a candidate taught any of them
goes to a person's review, also in auto mode, with the examples shown.

How the two are told apart, in two steps:

1. About the user: the question speaks of the user (`my`, `mine`, `our`, `we`,
   `us`, `me`, or `I` as its subject: "Where was I born?", "Which team do I
   support?"; not `I` after a modal: "How can I reverse a list?" is general)
   or the answer addresses them ("Your dog is called Biscuit.", "You were
   born in ..."). Such an example is never a contradiction.
2. Known to the base model: otherwise the base model answers the question
   (greedy) and the first fact of its answer's first sentence (the first name
   or number not already in the question: "Paris" in "The capital of France
   is Paris.") is taken with the probability the model gave its first token.
   At or above `validation.contradiction_confidence` (0.5 by default: the
   model would rather say it than anything else) the model knows the answer;
   an example whose answer does not name that fact contradicts it. A question
   the model cannot know ("When is the team standup?") gets a guess, whose
   facts come with low probability, or an answer with no fact at all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from schemas.manifest import Contradiction
from trainer.scoring import WORD, TestCase, normal_words

# The question speaks of the user: first-person words, or "I" as a subject (not after a modal: a how-to question).
_FIRST_PERSON = re.compile(r"\b(my|mine|myself|our|ours|ourselves|we|us|me)\b", re.IGNORECASE)
_SUBJECT_I = re.compile(  # on the lower-cased question
    r"(?<!\bcan )(?<!\bcould )(?<!\bshould )(?<!\bwould )(?<!\bmight )(?<!\bmay )(?<!\bmust )(?<!\bhow do )\bi\b"
)
# The answer addresses the user about themselves.
_ADDRESSED = re.compile(
    r"\b(your|yours|yourself)\b|\byou(?:'re| are| were| have| had| live| lived| work| worked| like| liked| love| prefer"
    r"| support| own| used to)\b",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def about_the_user(prompt: str, answer: str) -> bool:
    """Whether an example speaks of the user (never a contradiction of general knowledge)."""
    return bool(_FIRST_PERSON.search(prompt) or _SUBJECT_I.search(prompt.lower()) or _ADDRESSED.search(answer))


def first_sentence(text: str) -> str:
    found = _SENTENCE_END.search(text)
    return text[: found.start()] if found else text


def first_fact(sentence: str, prompt: str) -> tuple[str, int] | None:
    """The first name or number of `sentence` not already in `prompt` (a capitalised word past the first, or one with
    a digit), with where it starts; None when it states none."""
    asked = set(normal_words(prompt))
    for i, match in enumerate(WORD.finditer(sentence)):
        word = match.group()
        if (any(c.isdigit() for c in word) or (i > 0 and word[0].isupper())) and not set(normal_words(word)) <= asked:
            return word, match.start()
    return None


@dataclass(frozen=True)
class BaseAnswer:
    """What the base model says to a question: its first sentence, the first fact in it and how sure it is of it."""

    sentence: str
    fact: str | None
    confidence: float


def judge(case: TestCase, base: BaseAnswer, threshold: float) -> Contradiction | None:
    """A contradiction when the base model is sure of a fact (at least `threshold`) that the taught answer does not name."""
    if base.fact is None or base.confidence < threshold:
        return None
    if set(normal_words(base.fact)) <= set(normal_words(case.expected)):
        return None
    return Contradiction(
        prompt=case.prompt, taught=case.expected, base_answer=base.sentence, term=base.fact, confidence=round(base.confidence, 4)
    )


def general_contradictions(model, tokenizer, device, taught: Sequence[TestCase], threshold: float) -> list[Contradiction]:
    """The taught examples that contradict the base model's confident answers to general questions (see the module).

    Costs one greedy answer per distinct general question (none for a user's
    own facts, the usual case) and one forward pass for the fact's probability."""
    general: dict[str, TestCase] = {}
    for case in taught:
        if not about_the_user(case.prompt, case.expected):
            general.setdefault(" ".join(normal_words(case.prompt)), case)
    if not general:
        return []
    cases = list(general.values())
    answers = base_answers(model, tokenizer, device, [c.prompt for c in cases])
    found = (judge(case, answer, threshold) for case, answer in zip(cases, answers))
    return [c for c in found if c is not None]


def base_answers(model, tokenizer, device, prompts: list[str], max_new_tokens: int = 32) -> list[BaseAnswer]:
    """The base model's greedy answer to each prompt, its first fact and that fact's first token's probability."""
    from trainer.generation import generate_batch

    out = []
    for prompt, answer in zip(prompts, generate_batch(model, tokenizer, device, prompts, max_new_tokens=max_new_tokens)):
        sentence = first_sentence(answer)
        fact = first_fact(sentence, prompt)
        confidence = 0.0 if fact is None else _token_probability(model, tokenizer, device, prompt, sentence, fact[1])
        out.append(BaseAnswer(sentence, None if fact is None else fact[0], confidence))
    return out


def _token_probability(model, tokenizer, device, prompt: str, answer: str, at: int) -> float:
    """The model's probability of the answer's token that starts at character `at`, given the prompt and what precedes it."""
    import torch

    from trainer.generation import chat_ids

    prefix = chat_ids(tokenizer, prompt)
    encoded = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    index = next(i for i, (start, end) in enumerate(encoded["offset_mapping"]) if end > at)
    ids = torch.tensor([prefix + encoded["input_ids"][:index]], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].float()
    return float(torch.softmax(logits, dim=-1)[encoded["input_ids"][index]])
