"""The validation gate: a candidate adapter becomes active only if it passes.

    gate = GateSpec.from_settings(settings).build(model, tokenizer, device, base_sha256)
    report = gate.evaluate(candidate_dir, user_cases, reference_dir=None)
    report.passed, report.reasons, report.suites["core"].score

Two suites, answered by the base model plus the candidate adapter:
- core: a global set of prompts with expected answers (config/core_suite.jsonl,
  extendable by the operator). The candidate may score at most
  `regression_threshold` below the reference: the user's active adapter, or
  the base model when the user has none.
- user: the user's held-out split (never trained on) plus the user's explicit
  test cases. The candidate needs at least `promote_if_score`.
- preference (a preference-trained candidate): held-out corrected and rated
  answers; the candidate must prefer the liked one on at least
  `min_preference_accuracy` of the pairs (trainer/preference.py).

Each case is scored by trainer/scoring.py; every case's scores are kept in the
report, which goes to the validation log and, summarised, to the lifecycle
event. The reference's core scores are cached per adapter file hash, so the
base model or the active adapter is answered once per process.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from core.errors import InvalidMessage
from core.settings import Settings, config_file, defaults
from core.storage import atomic_write
from schemas.manifest import Contradiction
from schemas.training import TrainingExample
from trainer.contradictions import general_contradictions
from trainer.model import cache_identity
from trainer.scoring import (
    SCORER_VERSION,
    CaseScore,
    Embedder,
    ScoreWeights,
    TestCase,
    answers_match,
    mean_score,
    same_question,
    score_cases,
)


@dataclass(frozen=True)
class GateConfig:
    """The seed's `promote_if_score` and `regression_threshold` with `validation.*` (defaults: core/settings.py)."""

    promote_if_score: float
    regression_threshold: float
    weights: ScoreWeights
    require_user_tests: bool  # no held-out or explicit cases -> reject (nothing shows it learned)
    # Retention: the share of core prompts whose answer stays semantically equivalent to the base
    # model's (cosine >= retention_similarity, or both name the expected answer).
    retention_similarity: float
    min_retention: float
    # Forgetting: the share of the reference version's learned facts the candidate no longer answers.
    max_forgetting: float
    # Cases answered together: generation steps cost little more for more rows, so one batch is fastest.
    batch_size: int
    # Rated answers compared by their gain per token, as KTO learns them when training.preference_kto_token_beta > 0
    # (derived from that setting in from_settings), for a candidate whose own training
    # is not known: a job's candidates and a validated version's manifest say how they learned (Candidate.rated_per_token).
    rated_gain_per_token: bool
    # Taught answers that contradict the base model's confident answers to general questions (trainer/contradictions.py).
    contradiction_check: bool
    contradiction_confidence: float
    # A preference-trained candidate prefers the liked answer on at least this share of held-out rated pairs.
    min_preference_accuracy: float
    # A candidate rejected only for drift is gated again with its update scaled by each (trainer/job.py).
    drift_retry_scales: tuple[float, ...]

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides) -> GateConfig:
        s = settings or defaults()
        v = s.validation
        config = cls(
            promote_if_score=s.promote_if_score,
            regression_threshold=s.regression_threshold,
            weights=ScoreWeights.from_settings(s),
            require_user_tests=v.require_user_tests,
            retention_similarity=v.retention_similarity,
            min_retention=v.min_retention,
            max_forgetting=v.max_forgetting,
            batch_size=v.batch_size,
            contradiction_check=v.contradiction_check,
            contradiction_confidence=v.contradiction_confidence,
            min_preference_accuracy=v.min_preference_accuracy,
            rated_gain_per_token=s.training.preference_kto_token_beta > 0,
            drift_retry_scales=tuple(v.drift_retry_scales),
        )
        return replace(config, **overrides)


@dataclass
class SuiteReport:
    name: str
    score: float
    passed: bool
    threshold: float  # the score needed
    reference_score: float | None = None  # core: the active adapter's (or the base model's) score
    cases: list[CaseScore] = field(default_factory=list)
    before: list[CaseScore] = field(default_factory=list)  # the reference's answers to the same cases, when known

    def case_scores(self) -> list[dict[str, Any]]:
        """Every case's scores (with the reference's answer and score as `before`, when known): the validation log's."""
        rows = [asdict(c) for c in self.cases]
        if len(self.before) == len(rows):
            for row, before in zip(rows, self.before):
                row.update(before=before.answer, before_score=before.score)
        return rows

    def summary(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "passed": self.passed,
            "threshold": self.threshold,
            "reference_score": self.reference_score,
            "cases": len(self.cases),
        }


@dataclass
class GateReport:
    passed: bool
    reasons: list[str]
    suites: dict[str, SuiteReport]
    retention: float | None = None  # share of general prompts answered as the base model answers them
    forgetting: float | None = None  # share of the previous version's learned facts now missed
    contradictions: list[Contradiction] = field(default_factory=list)  # a passed candidate with any goes to review
    drifted: bool = False  # the core suite regressed or retention fell short: general answers moved too far

    @property
    def only_drifted(self) -> bool:
        """Rejected for drifted general answers and for nothing else (every other suite passed): a smaller multiple
        of the update may keep what was learned and pass."""
        return not self.passed and self.drifted and all(s.passed for name, s in self.suites.items() if name != "core")

    @property
    def facts_learned(self) -> float | None:
        """Share of the user's cases whose answer names the expected one."""
        cases = self.suites["user"].cases if "user" in self.suites else []
        return round(sum(c.match for c in cases) / len(cases), 4) if cases else None

    def metrics(self) -> dict[str, float]:
        """Flat numbers for lifecycle events and manifests."""
        out = {f"{name}_score": s.score for name, s in self.suites.items() if s.cases or name != "user"}
        core = self.suites.get("core")
        if core is not None and core.reference_score is not None:
            out["core_reference_score"] = core.reference_score
        if self.facts_learned is not None:
            out["facts_learned"] = self.facts_learned
        if self.retention is not None:
            out["retention"] = self.retention
        if self.forgetting is not None:
            out["forgetting"] = self.forgetting
        return out

    def facts(self) -> list[dict[str, Any]]:
        """The user's cases and whether each is answered: what the next version must not forget."""
        cases = self.suites["user"].cases if "user" in self.suites else []
        return [{"prompt": c.prompt, "expected": c.expected, "learned": bool(c.match)} for c in cases]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reasons": self.reasons,
            "metrics": self.metrics(),
            "suites": {name: {**s.summary(), "case_scores": s.case_scores()} for name, s in self.suites.items()},
            "contradictions": [c.model_dump() for c in self.contradictions],
        }

    def lines(self) -> list[str]:
        """A human-readable per-suite report."""
        out = [f"{'PASSED' if self.passed else 'REJECTED'}" + ("" if self.passed else ": " + "; ".join(self.reasons))]
        for name, s in self.suites.items():
            ref = f" (reference {s.reference_score:.3f})" if s.reference_score is not None else ""
            out.append(f"  {name} suite: {s.score:.3f}{ref}, needs >= {s.threshold:.3f} -> {'pass' if s.passed else 'FAIL'}")
            for c in s.cases:
                out.append(f"    [{c.score:.2f}] {c.prompt[:60]} -> {c.answer[:60]!r} (expected {c.expected[:40]!r})")
        if self.contradictions:
            out.append(
                f"  {len(self.contradictions)} taught answer(s) contradict the base model's knowledge (a person reviews it):"
            )
            for c in self.contradictions:
                out.append(f"    {c.prompt[:60]} -> {c.taught[:40]!r}; the base model says {c.term!r} (p {c.confidence:.2f})")
        return out


def load_cases(path: str | Path) -> list[TestCase]:
    """Read test cases from a JSONL file."""
    return parse_cases(Path(path).read_text(encoding="utf-8"), str(path))


def parse_cases(text: str, source: str) -> list[TestCase]:
    """JSONL lines with `prompt` and `expected` (or `response`); blank and # lines skipped; a bad line names itself."""
    cases = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            raw = json.loads(line)
            expected = raw.get("expected", raw.get("response"))
            if not isinstance(raw.get("prompt"), str) or not isinstance(expected, str) or not raw["prompt"].strip():
                raise ValueError("needs a non-empty string `prompt` and a string `expected`")
        except (ValueError, AttributeError) as exc:
            raise InvalidMessage(f"{source}:{number}: {exc}") from None
        cases.append(TestCase(raw["prompt"], expected))
    return cases


def suite_key(cases: list[TestCase], weights: ScoreWeights) -> str:
    """Identifies a suite and its scoring: reference scores are reused only under the same key."""
    blob = json.dumps([[c.prompt, c.expected] for c in cases] + [asdict(weights), SCORER_VERSION], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class GateSpec:
    """Everything needed to build a gate next to a loaded base model (plain values, from the settings)."""

    embedding_model: str
    core_suites: tuple[Path, ...]
    cfg: GateConfig
    user_tests_dir: str
    cache_dir: Path | None = None  # the base model's core scores are kept here, per base model and suite

    @classmethod
    def from_settings(cls, settings: Settings) -> GateSpec:
        """Core suite paths resolved here, at the edge (./config/ first, then the shipped config/)."""
        v = settings.validation
        paths = tuple(config_file(name, "validation.core_suites") for name in v.core_suites)
        return cls(
            settings.model.embedding_model, paths, GateConfig.from_settings(settings), v.user_tests_dir, settings.cache_dir
        )

    def build(self, model, tokenizer, device, base_sha256: str = "") -> Gate:
        """The gate around the loaded base model; its core scores cached per base model as loaded (`cache_identity`:
        its weights' sha256, apart when held in bfloat16 or 4 bits), none for an unidentified one ("")."""
        from trainer.scoring import load_embedder

        core = [case for path in self.core_suites for case in load_cases(path)]
        identity = cache_identity(base_sha256, model)
        cache = self.cache_dir / "gate" if self.cache_dir is not None and identity else None
        return Gate(model, tokenizer, device, load_embedder(self.embedding_model), core, self.cfg, cache, identity)


_KEPT_REFERENCES = 256


@dataclass(frozen=True)
class Candidate:
    """What `Gate.evaluate` judges: a candidate adapter, its user's cases, its reference, what it must keep, what it was taught."""

    candidate_dir: Path
    user_cases: list[TestCase]
    reference_dir: Path | None = None
    previous_facts: list[TestCase] = field(default_factory=list)
    taught: list[TestCase] = field(default_factory=list)
    preferences: list[TrainingExample] = field(default_factory=list)  # held-out pairs and rated answers
    # How its training learned rated answers (its manifest's record); None: as the gate's config says.
    rated_per_token: bool | None = None

    def suites(self, core: list[TestCase]) -> list[list[TestCase]]:
        return [core, self.user_cases, self.previous_facts]

    def arguments(self) -> dict[str, Any]:
        return {
            "candidate_dir": self.candidate_dir,
            "user_cases": self.user_cases,
            "reference_dir": self.reference_dir,
            "previous_facts": self.previous_facts,
            "taught": self.taught,
            "preferences": self.preferences,
            "rated_per_token": self.rated_per_token,
        }


def _lora_shape(adapter_dir: Path) -> tuple:
    """What must agree for adapters to share a batch: rank, scaling and the modules they adapt."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    modules = config.get("target_modules") or []
    return (config.get("r"), config.get("lora_alpha"), tuple(sorted(modules)), str(config.get("layers_to_transform")))


def _adapter_key(adapter_dir: Path | None) -> str:
    """What identifies an adapter's answers: its weights' sha256 ('base' for the base model alone)."""
    if adapter_dir is None:
        return "base"
    return hashlib.sha256((Path(adapter_dir) / "adapter_model.safetensors").read_bytes()).hexdigest()


class Gate:
    """Runs the suites with one kept base model; not thread-safe (one job at a time)."""

    def __init__(
        self,
        model,
        tokenizer,
        device,
        embedder: Embedder,
        core_cases: list[TestCase],
        cfg: GateConfig,
        cache_dir: Path | None = None,
        base_sha256: str = "",
    ) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.embedder = embedder
        self.core_cases = core_cases
        self.cfg = cfg
        self.core_key = suite_key(core_cases, cfg.weights)
        self._reference: dict[str, list[CaseScore]] = {}
        # The base model's answers never change: keep its core scores across processes.
        self._base_file = (
            cache_dir / f"{base_sha256[:16]}-{self.core_key}.json" if cache_dir is not None and base_sha256 else None
        )

    def score(self, adapter_dir: Path | None, cases: list[TestCase]) -> list[CaseScore]:
        """Answer and score `cases` with the base model plus the adapter (or the base model alone)."""
        if not cases:
            return []
        from trainer.lora import adapter_applied

        with adapter_applied(self.model, adapter_dir) as model:
            return self._score_with(model, cases)

    def _score_with(self, model, cases: list[TestCase]) -> list[CaseScore]:
        return score_cases(model, self.tokenizer, self.device, self.embedder, cases, self.cfg.weights, self.cfg.batch_size)

    def score_suites(self, adapter_dir: Path | None, suites: list[list[TestCase]]) -> list[list[CaseScore]]:
        """`score` for several suites at once: the adapter loads once and their cases share batches."""
        scores = self.score(adapter_dir, [case for suite in suites for case in suite])
        out, start = [], 0
        for suite in suites:
            out.append(scores[start : start + len(suite)])
            start += len(suite)
        return out

    def reference_core(self, reference_dir: Path | None) -> list[CaseScore]:
        """The reference's core scores, cached by the adapter file's hash (or 'base')."""
        key = _adapter_key(reference_dir)
        if key not in self._reference:
            if key == "base" and self._base_file is not None and self._base_file.is_file():
                self._reference[key] = [CaseScore(**c) for c in json.loads(self._base_file.read_text(encoding="utf-8"))]
            else:
                self._reference[key] = self.score(reference_dir, self.core_cases)
                if key == "base" and self._base_file is not None:
                    atomic_write(self._base_file, json.dumps([asdict(c) for c in self._reference[key]]).encode("utf-8"))
        return self._reference[key]

    def add_user_before(self, report: GateReport, reference_dir: Path | None) -> None:
        """The reference's answers to the user suite, next to the candidate's (what a reviewer compares)."""
        user = report.suites.get("user")
        if user is not None and user.cases:
            user.before = self.score(reference_dir, [TestCase(c.prompt, c.expected) for c in user.cases])

    def core_conflicts(self, taught: list[TestCase]) -> list[TestCase]:
        """Training examples that ask a core-suite question and teach an answer other than the core suite's."""
        return [
            t
            for t in taught
            for core in self.core_cases
            if same_question(t.prompt, core.prompt) and not answers_match(t.expected, core.expected)
        ]

    def evaluate(
        self,
        candidate_dir: Path,
        user_cases: list[TestCase],
        reference_dir: Path | None = None,
        previous_facts: list[TestCase] = (),
        taught: list[TestCase] = (),
        preferences: list[TrainingExample] = (),
        rated_per_token: bool | None = None,
    ) -> GateReport:
        """`previous_facts`: the facts the reference version learned (forgetting is measured on them).

        `taught`: the candidate's training examples. One that gives a core-suite
        question another answer ("What is the capital of France?" -> "Tromsø")
        rejects the candidate whatever the scores say, before any suite runs: the
        core suite is what no adapter may change, and a well-protected run changes
        little else, so the mean score alone can miss it.

        `preferences`: held-out pairs and rated answers; the candidate must prefer
        the liked answer on `min_preference_accuracy` of them (trainer/preference.py), rated answers compared
        per token or summed as `rated_per_token` says (how the candidate learned them; None: the gate's config).
        """
        candidate = Candidate(
            candidate_dir,
            list(user_cases),
            reference_dir,
            list(previous_facts),
            list(taught),
            list(preferences),
            rated_per_token,
        )
        refused = self._conflicting(candidate)
        if refused is not None:
            return refused
        report = self._report(candidate, self.score_suites(candidate_dir, candidate.suites(self.core_cases)))
        return self._with_contradictions(self._with_preference(report, candidate), candidate)

    def evaluate_batch(self, candidates: list[Candidate]) -> list[GateReport]:
        """`evaluate` for several candidates, their suites answered together in mixed-adapter batches.

        Each row of a batch goes through its own candidate (trainer/multi.py's
        hooks, no PEFT wrapper), so the candidates share every generation step;
        each verdict is the one `evaluate` gives that candidate alone. Candidates
        of another LoRA shape than the first are evaluated alone.
        """
        reports: dict[int, GateReport] = {}
        together: list[int] = []
        shapes: set = set()
        for i, candidate in enumerate(candidates):
            refused = self._conflicting(candidate)
            if refused is not None:
                reports[i] = refused
            else:
                together.append(i)
                shapes.add(_lora_shape(candidate.candidate_dir))
        if len(together) > 1 and len(shapes) == 1:
            suites = [candidates[i].suites(self.core_cases) for i in together]
            for i, scored in zip(together, self._score_together([candidates[i].candidate_dir for i in together], suites)):
                report = self._with_preference(self._report(candidates[i], scored), candidates[i])
                reports[i] = self._with_contradictions(report, candidates[i])
        else:
            for i in together:
                reports[i] = self.evaluate(**candidates[i].arguments())
        return [reports[i] for i in range(len(candidates))]

    def _score_together(self, adapters: list[Path], suites: list[list[list[TestCase]]]) -> list[list[list[CaseScore]]]:
        """Every candidate's suites scored in shared batches: row by row through its own candidate's LoRA."""
        from trainer.frozen import first_adapted_layer, frozen_below
        from trainer.loss import RowUsers
        from trainer.multi import read_lora, stacked_loras

        like = next(self.model.parameters())
        weights = [read_lora(path, like) for path in adapters]
        loras = stacked_loras(self.model, weights)
        below = frozen_below(self.model.model, first_adapted_layer(loras.modules))  # the core cases' lower layers once
        try:
            cases = [case for per in suites for suite in per for case in suite]
            users = tuple(n for n, per in enumerate(suites) for suite in per for _ in suite)
            scores = score_cases(
                self.model,
                self.tokenizer,
                self.device,
                self.embedder,
                cases,
                self.cfg.weights,
                self.cfg.batch_size,
                rows=RowUsers(users, loras.through),
                below=below,
            )
        finally:
            loras.remove()
        out, start = [], 0
        for per in suites:
            split = []
            for suite in per:
                split.append(scores[start : start + len(suite)])
                start += len(suite)
            out.append(split)
        return out

    def _with_preference(self, report: GateReport, candidate: Candidate) -> GateReport:
        """The `preference` suite: on held-out pairs and rated answers, the share where the candidate prefers the
        liked answer more than its reference does (trainer/preference.py); at least `min_preference_accuracy`."""
        from trainer.preference import preference_accuracy

        accuracy, pairs = preference_accuracy(
            self.model,
            self.tokenizer,
            self.device,
            candidate.candidate_dir,
            candidate.reference_dir,
            candidate.preferences,
            rated_per_token=self.cfg.rated_gain_per_token if candidate.rated_per_token is None else candidate.rated_per_token,
        )
        if accuracy is None:
            return report
        threshold = self.cfg.min_preference_accuracy
        suite = SuiteReport("preference", accuracy, accuracy >= threshold, threshold)
        report.suites["preference"] = suite
        if not suite.passed:
            report.reasons.append(
                f"preferred the liked answer on {accuracy:.0%} of {pairs} held-out rated pairs (at least {threshold:.0%})"
            )
            report.passed = False
        return report

    def _with_contradictions(self, report: GateReport, candidate: Candidate) -> GateReport:
        """A passed candidate's taught answers that contradict the base model's knowledge (a failed one is rejected
        anyway): it then goes to a person's review, whatever the promotion mode."""
        if report.passed and self.cfg.contradiction_check:
            report.contradictions = general_contradictions(
                self.model, self.tokenizer, self.device, candidate.taught, self.cfg.contradiction_confidence
            )
        return report

    def _conflicting(self, candidate: Candidate) -> GateReport | None:
        """A rejection before any suite runs when the candidate was taught to change core-suite answers."""
        conflicts = self.core_conflicts(candidate.taught)
        if not conflicts:
            return None
        shown = "; ".join(f"{c.prompt!r} -> {c.expected!r}" for c in conflicts[:3])
        # Rejected whatever it scores: answering the suites would only spend a gate's time (about half a minute
        # on a CPU) on a verdict already given.
        return GateReport(False, [f"trained to change {len(conflicts)} core-suite answer(s): {shown}"], {})

    def _report(self, c: Candidate, scores: list[list[CaseScore]]) -> GateReport:
        """The verdict from the candidate's scores on the core suite, its user cases and the previous facts."""
        cfg = self.cfg
        candidate, scored, again = scores
        reasons: list[str] = []
        suites: dict[str, SuiteReport] = {}
        retention = forgetting = None
        before = self.reference_core(c.reference_dir) if self.core_cases else []
        reference = mean_score(before) if before else 0.0
        if self.core_cases:
            # Kept: a promoted candidate is the next run's reference, and its core answers do not change.
            self._reference[_adapter_key(c.candidate_dir)] = candidate
            while len(self._reference) > _KEPT_REFERENCES:  # a long-running trainer sees many candidates
                del self._reference[next(k for k in self._reference if k != "base")]
            retention = self.retention(candidate)
            if retention < cfg.min_retention:
                reasons.append(
                    f"retention {retention:.3f} below {cfg.min_retention}: general answers drifted from the base model's"
                )
            core = SuiteReport(
                "core", mean_score(candidate), True, round(reference - cfg.regression_threshold, 4), reference, candidate, before
            )
            core.passed = core.score >= core.threshold
            if not core.passed:
                who = "the active adapter" if c.reference_dir is not None else "the base model"
                reasons.append(
                    f"core suite regressed: {core.score:.3f} vs {reference:.3f} for {who} "
                    f"(allowed drop {cfg.regression_threshold})"
                )
            suites["core"] = core

        user = SuiteReport("user", mean_score(scored), bool(scored), cfg.promote_if_score, None, scored)
        if scored:
            user.passed = user.score >= cfg.promote_if_score
            if not user.passed:
                reasons.append(f"user suite scored {user.score:.3f}, below promote_if_score {cfg.promote_if_score}")
        elif cfg.require_user_tests and not c.preferences:
            reasons.append("no user-specific test cases (empty held-out split and no explicit tests)")
        else:
            user.passed = True
        suites["user"] = user

        if c.previous_facts:
            forgetting = round(sum(1 - s.match for s in again) / len(again), 4)
            suites["previous"] = SuiteReport(
                "previous", mean_score(again), forgetting <= cfg.max_forgetting, cfg.max_forgetting, None, again
            )
            if forgetting > cfg.max_forgetting:
                reasons.append(f"forgot {forgetting:.0%} of what the previous version learned (at most {cfg.max_forgetting:.0%})")
        drifted = (retention is not None and retention < cfg.min_retention) or ("core" in suites and not suites["core"].passed)
        return GateReport(not reasons, reasons, suites, retention, forgetting, drifted=drifted)

    def retention(self, candidate: list[CaseScore]) -> float:
        """Share of core prompts answered as the base model answers them (same meaning, or both right)."""
        base = self.reference_core(None)
        similar = self.embedder.similarity([c.answer for c in candidate], [b.answer for b in base])
        kept = [sim >= self.cfg.retention_similarity or (c.match and b.match) for c, b, sim in zip(candidate, base, similar)]
        return round(sum(kept) / len(kept), 4)
