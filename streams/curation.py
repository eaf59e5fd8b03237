"""Curation: turn validated events into training examples and gap signals.

Plain functions, no Kafka: the worker, `adaptloop replay` and `adaptloop
generate-data` share them. Their settings are `streams.curation`
(`core.settings.CurationSettings`), taken as they are.

Rules (the seed's synthetic data generation):
- intent trace, missed/abandoned: a gap; with a `resolution` also an example
  (query -> resolution). satisfied: a good outcome. open: nothing yet.
- feedback correction: an example (query -> correction) with a high weight,
  and a gap; the corrected answer rides along as `rejected` (a preference
  pair). Rating < 0: a gap (that response was wrong). Rating > 0: raises
  the weight of the user's pending conversation example with the same prompt.
  Either way the rated answer is kept as a `rating` example (its `rating`
  field): preference training learns from it, and a disliked answer is never
  a supervised target.
- conversation turn: rated > 0 -> a Q&A example (with its rating); unrated
  (or neutral) -> a lower weight; rated < 0 -> a `rating` example only,
  counted as a negative rating gap.
- concept gap: "What is X?" -> description, and "How is X related to Y?" for
  each related Y; a gap for the user, or the global pool for user `global`.
- augmentation: `paraphrases` extra prompts per example from seeded templates,
  and `rewordings` rewordings of the question itself by rule (contractions,
  which/what, name/called, synonyms, wh-words, noun phrases:
  streams/rewording.py), each tagged with its kind (`wording`) so the
  held-out split can hold out a kind never trained on; a question the rules
  reword in fewer than two kinds gets `TEMPLATES_WITHOUT_REWORDINGS`
  templates at least, so every fact keeps a wording to hold out and one
  beside the question to train on; deterministic: the same prompt and seed
  give the same copies.
- consent: an event marked `"consent": "no-train"` (or any event of a user
  who opted out, streams/processor.py) is counted and may still say how the
  user was served, but gives no example, no gap and no boost (`without_training`).
- redaction (`redact_curated`): personal data in an example's prompt and
  response (and a thumbs-up's prompt, matched against redacted prompts)
  becomes a typed placeholder before anything is stored (core/redaction.py).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace
from typing import Literal

from core.redaction import Redactor
from core.settings import CurationSettings
from schemas.events import ConceptGap, ConversationTurn, Feedback, InputEvent, IntentTrace
from schemas.training import Provenance, TrainingExample
from streams.rewording import reworded_answers, rewordings

GapKind = Literal["missed_intent", "negative_rating", "correction", "concept_gap"]
GAP_KINDS: tuple[GapKind, ...] = ("missed_intent", "negative_rating", "correction", "concept_gap")
GLOBAL_USER = "global"

_TEMPLATES = (
    "Can you tell me: {q}",
    "Quick question: {q}",
    "{q} Please answer briefly.",
    "Remind me: {q}",
    "I'd like to know something. {q}",
    "Question for you: {q}",
    "Help me out here. {q}",
    "Tell me, {lq}",
)


@dataclass(frozen=True)
class Asked:
    """A question the user asked that may still lack a right answer (active learning, streams/active.py)."""

    question: str
    kind: Literal["missed_intent", "answered", "negative_rating", "failed_case"]  # answered: judged by its confidence
    confidence: float | None = None
    intent: str | None = None


@dataclass(frozen=True)
class Curated:
    """What one event contributes."""

    examples: tuple[TrainingExample, ...] = ()
    gap: GapKind | None = None
    outcome: bool | None = None  # True: the user was served well; False: badly
    boost_prompt: str | None = None  # a thumbs-up for this prompt
    to_global: bool = False  # the examples belong to the global pool
    asked: Asked | None = None  # a question that may still lack a right answer
    resolved: str | None = None  # a question that got its right answer (a correction, a resolution)
    answers_task: str | None = None  # the labelling task a correction answers


def _weight(base: float, confidence: float | None, cfg: CurationSettings) -> float:
    if cfg.confidence_weighting and confidence is not None:
        base *= 0.5 + 0.5 * confidence
    return round(min(base, 10.0), 6)


def _example(
    prompt: str, response: str, source: str, weight: float, event: InputEvent, prov: Provenance | None, **preference
) -> TrainingExample:
    """`preference`: `rejected` (the answer a correction replaced) or `rating` (of a rated answer)."""
    return TrainingExample(
        prompt=prompt, response=response, source=source, weight=weight, event_id=event.event_id, provenance=prov, **preference
    )


def _rated(
    prompt: str, answer: str, rating: float, event: InputEvent, prov: Provenance | None, cfg: CurationSettings
) -> tuple[TrainingExample, ...]:
    """A rated answer as it was given (source `rating`): what a preference objective learns from; a disliked one is
    never a supervised target (trainer/preference.py)."""
    if rating == 0 or not answer.strip():
        return ()
    weight = round(cfg.conversation_weight * (0.5 + 0.5 * abs(rating)), 6)
    return (_example(prompt, answer, "rating", weight, event, prov, rating=round(rating, 6)),)


def curate(event: InputEvent, provenance: Provenance | None, cfg: CurationSettings) -> Curated:
    """The examples and signals of one validated event (before augmentation)."""
    if isinstance(event, IntentTrace):
        if event.status in ("missed", "abandoned"):
            if event.resolution:
                w = _weight(cfg.resolution_weight, event.confidence, cfg)
                example = _example(event.query, event.resolution, "intent", w, event, provenance)
                return Curated(examples=(example,), gap="missed_intent", outcome=False, resolved=event.query)
            asked = Asked(event.query, "missed_intent", event.confidence, event.intent)
            return Curated(gap="missed_intent", outcome=False, asked=asked)
        asked = Asked(event.query, "answered", event.confidence, event.intent) if event.confidence is not None else None
        if event.status == "satisfied":
            return Curated(outcome=True, asked=asked)
        return Curated(asked=asked)
    if isinstance(event, Feedback):
        if event.kind == "correction":
            assert event.correction is not None
            # A pair: the correction is preferred to the answer it replaced.
            replaced = event.response if event.response.strip() and event.response.strip() != event.correction.strip() else None
            example = _example(
                event.query, event.correction, "correction", cfg.correction_weight, event, provenance, rejected=replaced
            )
            return Curated(
                examples=(example,),
                gap="correction",
                outcome=False,
                resolved=event.query,
                answers_task=event.review_request_id,
            )
        rating = event.normalized_rating or 0.0
        rated = _rated(event.query, event.response, rating, event, provenance, cfg)
        if rating < 0:
            return Curated(rated, gap="negative_rating", outcome=False, asked=Asked(event.query, "negative_rating"))
        if rating > 0:
            return Curated(rated, outcome=True, boost_prompt=event.query)
        return Curated()
    if isinstance(event, ConversationTurn):
        rating = event.normalized_rating
        if rating is not None and rating < 0:
            rated = _rated(event.question, event.answer, rating, event, provenance, cfg)
            return Curated(rated, gap="negative_rating", outcome=False, asked=Asked(event.question, "negative_rating"))
        if rating is not None and rating > 0:
            weight = cfg.conversation_weight * (0.5 + 0.5 * rating)
            example = _example(event.question, event.answer, "conversation", round(weight, 6), event, provenance, rating=rating)
            return Curated(examples=(example,), outcome=True)
        example = _example(event.question, event.answer, "conversation", cfg.unrated_weight, event, provenance)
        return Curated(examples=(example,))
    if isinstance(event, ConceptGap):
        w = _weight(cfg.concept_weight, event.confidence, cfg)
        is_global = event.user_id == GLOBAL_USER
        source = "global" if is_global else "concept"
        examples = [_example(f"What is {event.concept}?", event.description, source, w, event, provenance)]
        for other in event.related:
            examples.append(
                _example(
                    f"How is {event.concept} related to {other}?",
                    f"{event.concept} is related to {other}. {event.description}",
                    source,
                    w,
                    event,
                    provenance,
                )
            )
        return Curated(examples=tuple(examples), gap=None if is_global else "concept_gap", to_global=is_global)
    raise TypeError(f"no curation rule for {type(event).__name__}")


def without_training(curated: Curated) -> Curated:
    """What an event gives when it may not be trained on: only its outcome (for metrics and rollback)."""
    return Curated(outcome=curated.outcome)


def redact_curated(curated: Curated, redactor: Redactor) -> tuple[Curated, dict[str, int]]:
    """`curated` with personal data in its texts replaced by placeholders, and how many of each type.

    Every text that can reach a dataset, a metric's label or a labelling task
    is redacted: an example's prompt, its response, the answer a correction
    replaced, and the questions the state keeps.
    """
    found: dict[str, int] = {}  # a plain dict: ~12x cheaper to make than a Counter, once per event
    if not redactor.enabled:
        return curated, found
    examples = tuple([_redacted_example(e, redactor, found) for e in curated.examples])
    # The question of a correction or a rating is its example's prompt too: redacted (and counted) once.
    asked_as, cleaned_as = (curated.examples[0].prompt, examples[0].prompt) if examples else (None, None)

    def clean(text: str) -> str:
        return cleaned_as if text == asked_as else redactor.redact_into(text, found)

    boost = None if curated.boost_prompt is None else clean(curated.boost_prompt)
    resolved = None if curated.resolved is None else clean(curated.resolved)
    question = None if curated.asked is None else clean(curated.asked.question)
    if not found:
        return curated, found  # nothing personal (most events): no copies
    asked = None if curated.asked is None else replace(curated.asked, question=question)
    return replace(curated, examples=examples, boost_prompt=boost, resolved=resolved, asked=asked), found


def _redacted_example(example: TrainingExample, redactor: Redactor, found: dict[str, int]) -> TrainingExample:
    prompt = redactor.redact_into(example.prompt, found)
    response = redactor.redact_into(example.response, found)
    rejected = None if example.rejected is None else redactor.redact_into(example.rejected, found)
    if prompt is example.prompt and response is example.response and rejected is example.rejected:
        return example  # redact_into hands back the very text when it found nothing
    return example.model_copy(update={"prompt": prompt, "response": response, "rejected": rejected})


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


def paraphrases(prompt: str, n: int, seed: int) -> list[str]:
    """`n` deterministic paraphrases of `prompt`, each different from it and from each other."""
    if n <= 0:
        return []
    rng = random.Random(_stable_seed(seed, prompt))
    lowered = prompt[:1].lower() + prompt[1:]
    out: list[str] = []
    for template in rng.sample(_TEMPLATES, k=len(_TEMPLATES)):
        text = template.format(q=prompt, lq=lowered)
        if text != prompt and text not in out and len(text) <= 4000:
            out.append(text)
        if len(out) == n:
            break
    return out


TEMPLATES_WITHOUT_REWORDINGS = 2


def chosen_rewordings(prompt: str, n: int, seed: int) -> list[tuple[str, str]]:
    """Up to `n` of the question's rewordings (streams/rewording.py), a kind at a time in a seeded order of kinds, so
    as many kinds as possible are present (one of them is held out, schemas/dataset.py)."""
    if n <= 0:
        return []
    by_kind: dict[str, list[str]] = {}
    for kind, text in rewordings(prompt):
        if len(text) <= 4000:
            by_kind.setdefault(kind, []).append(text)
    kinds = sorted(by_kind)
    random.Random(_stable_seed(seed, "kinds", prompt)).shuffle(kinds)
    out: list[tuple[str, str]] = []
    while len(out) < n and any(by_kind.values()):
        for kind in kinds:
            if by_kind[kind] and len(out) < n:
                out.append((kind, by_kind[kind].pop(0)))
    return out


def augment(examples: list[TrainingExample], n: int, seed: int, reworded: int = 0) -> list[TrainingExample]:
    """Each example followed by its paraphrased copies (same event_id and weight): `n` templates around the question,
    each answered in a slightly other wording that keeps the answer's key words where one exists, then `reworded`
    rewordings of the question itself (answered as taught: the held-out kind is judged on the taught answer).

    With rewordings on, a question the rules reword in fewer than two kinds ("How do I reset the router?": none;
    "What is fact 6?": "What's fact 6?" only) gets `TEMPLATES_WITHOUT_REWORDINGS` templates at least: one kind is held
    out, and without them the fact would have nothing to hold out (early stopping and the gate could not ask about
    it) or nothing but the question itself to train on."""
    out: list[TrainingExample] = []
    for example in examples:
        out.append(example)
        if example.rated_answer:
            continue  # an answer as it was given to the question as it was asked: not a fact to learn in other words
        reworded_copies = chosen_rewordings(example.prompt, reworded, seed)
        few_kinds = len({kind for kind, _ in reworded_copies}) < 2
        templates = max(n, TEMPLATES_WITHOUT_REWORDINGS) if reworded > 0 and few_kinds else n
        answers = [example.response, *reworded_answers(example.response)]
        for i, text in enumerate(paraphrases(example.prompt, templates, seed)):
            response = answers[i % len(answers)] if reworded > 0 else example.response
            out.append(example.model_copy(update={"prompt": text, "response": response, "wording": "template"}))
        for kind, text in reworded_copies:
            out.append(example.model_copy(update={"prompt": text, "wording": kind}))
    return out


def dedupe(examples: list[TrainingExample]) -> list[TrainingExample]:
    """Drop identical (prompt, response) pairs, keeping the first and the highest weight."""
    index: dict[tuple[str, str], int] = {}
    out: list[TrainingExample] = []
    for example in examples:
        key = (example.prompt.strip().casefold(), example.response.strip())
        if key in index:
            kept = out[index[key]]
            update = {"weight": example.weight} if example.weight > kept.weight else {}
            if kept.rating is None and example.rating is not None:
                update["rating"] = example.rating  # a thumbs-up on a kept answer: the preference objective sees it
            if update:
                out[index[key]] = kept.model_copy(update=update)
            continue
        index[key] = len(out)
        out.append(example)
    return out
