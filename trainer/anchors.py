"""The anchor set: general prompts with the base model's own answers, mixed into every training run.

    anchor_set = AnchorSet(prompts, cache_dir, base_sha256)      # or AnchorSet.from_settings(settings, base_sha256, model)
    mix = AnchorMix.from_settings(settings)
    chosen = choose_anchor_prompts(user_examples, anchor_set.prompts, mix, seed=0)
    mixed = mix_anchors(user_examples, anchor_set.answers(model, tokenizer, device, chosen), mix)

A LoRA fine-tune on a handful of personal facts learns them and rewrites
general answers too ("the capital of France is <the user's birthplace>").
Training on the base model's own answers to a few hundred general prompts
(self-distillation) alongside the user's examples keeps those answers where
they were. Each answer is generated once per base model (greedy, batched),
when a run first samples its prompt, and cached as JSONL under
`<cache_dir>/anchors/`, as are the margins that rank them by the base
model's certainty (`training.anchor_least_sure`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from core.settings import Settings, config_file, defaults
from schemas.training import TrainingExample
from trainer.generation import generate_batch
from trainer.model import cache_identity

log = logging.getLogger("adaptloop.trainer")


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and `#` comments skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class AnchorSet:
    """The anchor prompts, and the base model's answers to them: generated on first use, cached per base model.

    Only the prompts a run samples or ranks are answered, and the cache (JSONL
    under `<cache_dir>/anchors/<base sha256>-<answer tokens>.jsonl`, the sha256
    mixed with the precision for a base model held in bfloat16 or 4 bits
    (trainer/model.py `cache_identity`, which `from_settings` passes as `base_sha256`), the
    certainty ranking's margins beside it in `...-margins.jsonl`) fills as
    runs go; a run that ranks the anchors by certainty answers them all once.
    """

    @classmethod
    def from_settings(cls, settings: Settings, base_sha256: str, model) -> AnchorSet | None:
        """The anchor set the settings name (`training.anchor_files`), or None when `training.anchors` is off; cached
        per base model as `model` holds it (`cache_identity`)."""
        t = settings.training
        if not t.anchors:
            return None
        prompts = [p for name in t.anchor_files for p in read_prompts(config_file(name, "training.anchor_files"))]
        identity = cache_identity(base_sha256, model)
        return cls(prompts, settings.cache_dir, identity, settings.model.embedding_model, t.anchor_answer_tokens)

    def __init__(
        self,
        prompts: list[str],
        cache_dir: Path,
        base_sha256: str,
        embedding_model: str | None = None,
        answer_tokens: int | None = None,
    ) -> None:
        """`answer_tokens` None: the shipped `training.anchor_answer_tokens`."""
        if answer_tokens is None:
            answer_tokens = defaults().training.anchor_answer_tokens
        self.prompts = list(prompts)
        self.embedding_model = embedding_model  # None: no nearest-first choice
        self.answer_tokens = answer_tokens  # the KL is taken along the base answer: its first sentence is enough
        self._vectors = None
        # An unidentified base model (a hub id) is never cached: its weights could change.
        self.cache_file = Path(cache_dir) / "anchors" / f"{base_sha256[:32]}-{answer_tokens}.jsonl" if base_sha256 else None
        self._answers: dict[str, str] | None = None
        # Per prompt: the base answer's smallest top-1/top-2 gap, cached beside the answers it was taken along.
        self.margins_file = self.cache_file.with_name(f"{self.cache_file.stem}-margins.jsonl") if self.cache_file else None
        self._margins: dict[str, float] | None = None

    def _load(self) -> dict[str, str]:
        if self._answers is None:
            self._answers = _read_cache(self.cache_file, "answer")
        return self._answers

    def _load_margins(self) -> dict[str, float]:
        if self._margins is None:
            cached = _read_cache(self.margins_file, "margin")
            self._margins = {
                p: float("inf") if m is None else float(m) for p, m in cached.items() if m is None or isinstance(m, int | float)
            }
        return self._margins

    def nearest_first(self, queries: list[str], candidates: list[str]) -> list[str]:
        """`candidates` (a subset of the prompts), the most similar to any of `queries` first."""
        if self.embedding_model is None or not queries or not candidates:
            return list(candidates)
        from trainer.scoring import load_embedder

        embedder = load_embedder(self.embedding_model)
        if self._vectors is None:
            self._vectors = dict(zip(self.prompts, embedder.encode(self.prompts)))
        import torch

        closeness = (
            (torch.stack([self._vectors[c] for c in candidates]) @ embedder.encode(list(dict.fromkeys(queries))).T)
            .max(dim=1)
            .values
        )
        return [candidates[i] for i in closeness.argsort(descending=True).tolist()]

    def least_sure_first(self, model, tokenizer, device, candidates: list[str]) -> list[str]:
        """`candidates` (a subset of the prompts), those the base model answers least surely first: by the smallest
        gap between its top two next-token log-probabilities along its answer (the model must be the plain base)."""
        margins = self._load_margins()
        missing = [p for p in dict.fromkeys(candidates) if p not in margins]
        if missing:
            started = time.perf_counter()
            answered = self.answers(model, tokenizer, device, missing)
            fresh = dict(zip((a.prompt for a in answered), answer_margins(model, tokenizer, device, answered)))
            fresh.update((p, float("inf")) for p in missing if p not in fresh)  # no usable answer: never "least sure"
            margins.update(fresh)
            log.info(
                "ranked %d anchor prompts by the base model's certainty in %.1f s", len(missing), time.perf_counter() - started
            )
            _append_cache(self.margins_file, "margin", {p: None if m == float("inf") else m for p, m in fresh.items()})
        return sorted(candidates, key=margins.__getitem__)

    def answers(self, model, tokenizer, device, prompts: list[str]) -> list[TrainingExample]:
        """Anchor examples for `prompts` (the model must be the plain base model)."""
        known = self._load()
        missing = [p for p in dict.fromkeys(prompts) if p not in known]
        if missing:
            log.info("answering %d anchor prompts with the base model (cached afterwards)", len(missing))
            fresh = dict(zip(missing, generate_batch(model, tokenizer, device, missing, self.answer_tokens, batch_size=32)))
            known.update(fresh)
            _append_cache(self.cache_file, "answer", fresh)
        examples = []
        for prompt in prompts:
            try:
                examples.append(TrainingExample(prompt=prompt, response=known[prompt], source="anchor"))
            except ValueError:  # an empty answer, or one with control characters: not worth teaching back
                continue
        return examples


def _read_cache(path: Path | None, field: str) -> dict:
    """A JSONL cache's `field` per prompt; a line cut short by a crash is skipped (its prompt is done again)."""
    entries = {}
    if path is not None and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                entries[entry["prompt"]] = entry[field]
            except (ValueError, KeyError, TypeError):
                continue
    return entries


def _append_cache(path: Path | None, field: str, entries: dict) -> None:
    """Add `entries` (prompt -> `field`) to a JSONL cache in one appending write, so two trainers filling the same
    cache at once add whole lines (a duplicate line is harmless: the last one read wins, and they agree)."""
    if path is None or not entries:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"prompt": p, field: value}) + "\n" for p, value in entries.items()).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, lines)
    finally:
        os.close(fd)


def answer_margins(model, tokenizer, device, examples: list[TrainingExample], batch_size: int = 16) -> list[float]:
    """Per example, the smallest gap (nats) between the model's two likeliest next tokens at any of its answer's
    positions: how close the model's own answer came to taking another path."""
    import torch

    from trainer.data import collate, tokenize
    from trainer.generation import pad_id
    from trainer.loss import predicting_states

    items = tokenize(tokenizer, examples, 512)
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            ids, mask, labels, _ = collate(items[start : start + batch_size], pad_id(tokenizer), device)
            # As the training loss does: the shared prefix once, the vocabulary only where an answer token is predicted.
            hidden, targets = predicting_states(model.model, ids, mask, labels)
            for row in range(ids.shape[0]):
                top2 = model.lm_head(hidden[row][targets[row] != -100]).float().topk(2, dim=-1).values
                out.append(float((top2[:, 0] - top2[:, 1]).min()))
    return out


@dataclass(frozen=True)
class AnchorMix:
    """How many anchors join a run: ratio x the user's examples, at least `minimum`; their loss weight.

    `nearest`: the share of them that are the prompts closest to the user's
    (by sentence embedding); `least_sure`: in a run that teaches facts, the
    share of the rest that are the prompts the base model answers least
    surely (`choose_anchor_prompts`); the others are a seeded sample.
    (Defaults: core/settings.py `training.anchor_*`.)
    """

    ratio: float
    minimum: int
    weight: float
    nearest: float
    least_sure: float

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides) -> AnchorMix:
        t = (settings or defaults()).training
        return replace(
            cls(
                ratio=t.anchor_ratio,
                minimum=t.anchor_min,
                weight=t.anchor_weight,
                nearest=t.anchor_nearest,
                least_sure=t.anchor_least_sure,
            ),
            **overrides,
        )


def _normal(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip("?.! ")


def choose_anchor_prompts(
    examples: list[TrainingExample],
    prompts: list[str],
    mix: AnchorMix,
    seed: int,
    nearest_first: Callable[[list[str], list[str]], list[str]] | None = None,
    avoid: Iterable[str] = (),
    least_sure_first: Callable[[list[str]], list[str]] | None = None,
) -> list[str]:
    """The anchor prompts for a run: ratio x as many as the user's examples, at least `minimum`.

    With `nearest_first` (AnchorSet.nearest_first), `mix.nearest` of them are
    the prompts most like the user's: a new answer leaks into similar
    questions first ("Which city was my sister born in?" -> "What is the
    capital of Spain?"). With `least_sure_first` (AnchorSet.least_sure_first),
    in a run that teaches facts, `mix.least_sure` of the others are the
    prompts whose base answers are the least sure: where a small update flips
    a general answer first. The rest are a seeded sample. Anchors asking what
    a user example asks (or a prompt in `avoid`) are left out: the user's
    answer wins.
    """
    taught = {_normal(e.prompt) for e in examples} | {_normal(p) for p in avoid}
    usable = [p for p in dict.fromkeys(prompts) if _normal(p) not in taught]
    count = min(len(usable), max(mix.minimum, round(mix.ratio * len(examples))))
    if count <= 0:
        return []
    near = nearest_first([e.prompt for e in examples], usable)[: round(mix.nearest * count)] if nearest_first and examples else []
    rest = [p for p in usable if p not in set(near)]
    # Only beside facts: a run that teaches none (ratings only) would get the same few least-sure prompts as all of
    # its anchors, for every such user; measured, that cost ratings-only versions promotions (benchmarks/README.md).
    unsure = (
        least_sure_first(rest)[: round(mix.least_sure * (count - len(near)))]
        if least_sure_first and mix.least_sure > 0 and examples
        else []
    )
    rest = [p for p in rest if p not in set(unsure)]
    return near + unsure + random.Random(seed).sample(rest, count - len(near) - len(unsure))


def mix_anchors(examples: list[TrainingExample], anchors: list[TrainingExample], mix: AnchorMix) -> list[TrainingExample]:
    """The user's examples plus the anchors, weighted for the run."""
    return list(examples) + [a.model_copy(update={"weight": mix.weight, "source": "anchor"}) for a in anchors]
