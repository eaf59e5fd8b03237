"""One training job from dataset to decision, shared by `adaptloop train` and the trainer service.

    runner = JobRunner(registry, base, model, tokenizer, device, cfg, gate, anchors, anchor_mix)
    outcome = runner.run(TrainingJob(user_id, examples, held_out, dataset_uri, dataset_sha256), work_dir)

A job: thin the replayed examples, mix in the anchors, train (warm-started
from the user's active version; early stopping and the shrink step ask the
`FactCheck`), run the validation gate on the candidate, register it with a
manifest that records the gate's result, then promote it (the active pointer
swaps atomically), or put it up for a person's review (review mode,
trainer/review.py), or reject it (the active version stays). Every gate result
goes to the validation log.

The gate runs before the version is registered, so its result is part of the
immutable manifest; a crash after registering is finished by `apply_decision`
when the request comes again.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from core.encryption import open_store, user_seal
from core.errors import AdaptloopError, StorageError, TrainingSkipped
from core.settings import Settings
from core.storage import ArtifactStore, scratch_dir
from schemas.lifecycle import reason_text
from schemas.manifest import (
    ADAPTER_WEIGHTS,
    AdapterManifest,
    Case,
    DatasetInfo,
    EarlyStopping,
    Fact,
    PreferenceCase,
    ValidationRecord,
)
from schemas.training import OffsetRange, TrainingExample
from trainer.anchors import AnchorMix, AnchorSet, choose_anchor_prompts, mix_anchors
from trainer.data import thin_replay
from trainer.gate import Candidate, Gate, GateReport, GateSpec, parse_cases
from trainer.generation import generate_batch
from trainer.lora import write_scaled_update
from trainer.model import BaseModelRef
from trainer.multi import UserRun, train_adapters
from trainer.paraphrase import ParaphraseFilter, Paraphraser
from trainer.preference import uses_preference
from trainer.registry import AdapterRegistry, VersionInfo, verify_adapter_dir
from trainer.review import open_review, promote, promotion_mode
from trainer.scoring import TestCase, answers_match, load_embedder
from trainer.train import StepReport, TrainConfig, TrainHooks, TrainResult, remove_checkpoint, train_adapter

log = logging.getLogger("adaptloop.trainer")


@dataclass(frozen=True)
class TrainingJob:
    """What one version is trained from, and what asked for it."""

    user_id: str
    examples: list[TrainingExample]
    held_out: list[TrainingExample]
    dataset_uri: str
    dataset_sha256: str
    trigger: str = "manual"
    request_id: str | None = None
    lineage: list[OffsetRange] = field(default_factory=list)
    explicit_cases: list[TestCase] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    """A trained version and what the gate made of it."""

    info: VersionInfo
    report: GateReport | None
    decision: str  # promoted | awaiting_review | rejected | candidate (no gate)


# ---- what the registry says about the user ---------------------------------------- #


def user_tests_file(tests_dir: str, user_id: str) -> str:
    """Where the user's explicit test cases live in the store: `<tests_dir>/user_<id>.jsonl`."""
    return f"{tests_dir.strip('/')}/user_{user_id}.jsonl"


def user_cases(store: ArtifactStore, tests_dir: str, user_id: str) -> list[TestCase]:
    """The user's explicit test cases (`<tests_dir>/user_<id>.jsonl` in the store), if any."""
    relative = user_tests_file(tests_dir, user_id)
    if not store.exists(relative):
        return []
    return parse_cases(store.read_bytes(relative).decode("utf-8"), store.uri(relative))


# Examples that are not the user's own new ones: earlier facts replayed, the global pool, the anchors.
NOT_NEW = frozenset({"replay", "global", "anchor"})


def skip_reason(registry: AdapterRegistry, user_id: str, examples: list[TrainingExample]) -> str | None:
    """Why a dataset is not worth a version (None: train it): it holds none of the user's own new examples.

    A retrain for a user with no events, or one with nothing new since the
    last version, would otherwise train on replay, the global pool and anchors
    alone for a minute and register a version that teaches nothing.
    """
    if any(e.source not in NOT_NEW for e in examples):
        return None
    latest = registry.active(user_id) or max((i.version for i in registry.versions(user_id)), default=None)
    return "no examples" if latest is None else f"nothing new since v{latest}"


def as_cases(examples: list[TrainingExample]) -> list[TestCase]:
    """The taught facts of `examples` as cases (a rated answer is judged by preference, not recalled)."""
    return [TestCase(e.prompt, e.response) for e in examples if not e.rated_answer]


def judged_preferences(objective: str, examples: list[TrainingExample], held_out: list[TrainingExample]) -> list[TrainingExample]:
    """The held-out pairs and rated answers the gate's preference suite asks, when the run trained on preferences."""
    return [e for e in held_out if e.preference] if uses_preference(objective, examples) else []


def reference_dir(registry: AdapterRegistry, user_id: str, target: Path) -> tuple[Path | None, int | None]:
    """The adapter a candidate is compared with: the user's active version, verified; None = the base model.

    Sealed at rest, the version's opened files are written to `target` (in the job's work dir) for PEFT to load."""
    active = registry.active(user_id)
    if active is None:
        return None, None
    try:
        return registry.plain_dir(registry.info(user_id, active).path, target), active  # checked before PEFT loads it
    except StorageError as exc:  # never load a tampered adapter, not even as a reference
        log.error("active adapter unusable as the reference, comparing with the base model: %s", exc)
        return None, None


def learned_facts(registry: AdapterRegistry, user_id: str, version: int | None) -> list[TestCase]:
    """The facts `version` answered at its own validation (its manifest's `facts`); forgetting is measured on them."""
    if version is None:
        return []
    return [TestCase(f.prompt, f.expected) for f in registry.info(user_id, version).manifest.learned_facts()]


def same_shape(registry: AdapterRegistry, user_id: str, version: int | None, base: BaseModelRef, cfg: TrainConfig) -> bool:
    """Whether `version` can be a warm start for this run: same base model, same LoRA rank, alpha, modules and layers."""
    if version is None:
        return False
    manifest = registry.info(user_id, version).manifest
    wanted = (cfg.r, cfg.alpha, cfg.top_layer_share, tuple(sorted(cfg.target_modules)))
    same = (manifest.base_model, manifest.base_model_sha256) == (
        base.model_id,
        base.sha256,
    ) and manifest.hyperparameters.lora_shape() == wanted
    if not same:
        log.info("version %s of %s has another base model or LoRA shape: training from zero", version, user_id)
    return same


def replay_to_train(examples: list[TrainingExample], per_fact: int, warm: bool) -> list[TrainingExample]:
    """The job's examples with the replayed ones thinned to `per_fact` reminders per earlier fact on a warm start;
    a run from zero (no active version of this shape) learns the earlier facts again, from every replayed example."""
    return thin_replay(examples, per_fact) if warm else list(examples)


def apply_decision(
    registry: AdapterRegistry,
    info: VersionInfo,
    report: GateReport | None = None,
    *,
    job_id: str | None = None,
    mode: str = "auto",
) -> str:
    """Carry out a registered version's recorded gate verdict; idempotent (safe to redo after a crash).

    Passed: promoted (`mode` auto), or put up for review (`mode` review, or
    taught answers that contradict the base model's knowledge: trainer/review.py,
    trainer/contradictions.py); failed: rejected. Returns the decision: promoted,
    awaiting_review, rejected, or candidate (no gate ran). A version that went
    to review stays `awaiting_review` here until a person's approval made it
    active (then `promoted`)."""
    validation = info.manifest.validation
    if validation is None:
        return "candidate"
    user_id, version = info.user_id, info.version
    done = {e["status"] for e in registry.history(user_id) if e["version"] == version}
    if not done & {"active", "rejected", "awaiting_review"}:
        if not any(r.get("version") == version and r.get("kind") == "gate" for r in registry.validation_results(user_id)):
            record = report.to_dict() if report is not None else validation.model_dump(mode="json")
            registry.log_validation(user_id, version, record, kind="gate", request_id=info.manifest.request_id, job_id=job_id)
        if validation.passed and (mode == "review" or validation.contradictions):
            open_review(registry, info, _review_reason(validation))
            done.add("awaiting_review")
        elif validation.passed:
            promote(registry, user_id, version, reason="passed the validation gate")
            done.add("active")
        else:
            registry.mark(user_id, version, "rejected", reasons=validation.reasons)
    if not validation.passed:
        return "rejected"
    return "promoted" if "active" in done else "awaiting_review"


def _review_reason(validation: ValidationRecord) -> str:
    if not validation.contradictions:
        return "promotion mode review"
    terms = "; ".join(f"{c.prompt!r} -> {c.taught!r} (the base model says {c.term})" for c in validation.contradictions[:3])
    return reason_text(f"{len(validation.contradictions)} taught answer(s) contradict the base model's knowledge: {terms}")


# ---- progress ------------------------------------------------------------------------ #


def _describe(report: StepReport) -> str:
    parts = [f"loss {report.loss:.3f}"]
    if report.user_loss is not None:
        parts.append(f"user loss {report.user_loss:.3f}")
    if report.anchor_kl is not None:
        parts.append(f"anchor KL {report.anchor_kl:.4f}")
    return ", ".join(parts)


def progress_bar():
    """Progress on a terminal (`adaptloop train`): a bar with both parts of the loss."""
    from tqdm import tqdm

    bar = tqdm(total=None, desc="training", unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(report: StepReport) -> None:
        if bar.total != report.total:
            bar.total = report.total
        bar.n = report.step
        bar.set_postfix_str(_describe(report))
        bar.refresh()

    return bar, update


def is_tick(report: StepReport) -> bool:
    """About every tenth of a run's steps, and its last: when a service reports progress."""
    return report.step == report.total or report.step % max(1, report.total // 10) == 0


def progress_log(user_id: str):
    """Progress for a service without a terminal: one log line per tenth of the steps."""

    def update(report: StepReport) -> None:
        if is_tick(report):
            log.info("training %s: step %d/%d, %s", user_id, report.step, report.total, _describe(report))

    return update


# ---- checking the facts during training ---------------------------------------------- #


def no_fact_lost(hits: list[bool], trained_hits: list[bool]) -> bool:
    """Whether a shrunk update answers every case the update as trained answered (every case, when that is unknown)."""
    if not trained_hits:
        return all(hits)
    return all(hit or not trained for hit, trained in zip(hits, trained_hits, strict=True))


class FactCheck:
    """Which held-out paraphrases and earlier facts a model answers: early stopping and the shrink step ask it.

    Every check is logged and kept (`checks`) for the manifest.
    """

    def __init__(
        self, tokenizer, device, user_id: str, held_out: list[TrainingExample], previous: list[TestCase], min_epochs: int
    ) -> None:
        self.tokenizer, self.device, self.user_id, self.min_epochs = tokenizer, device, user_id, min_epochs
        self.held_out, self.previous = held_out, previous
        self.cases = [(e.prompt, e.response) for e in held_out] + [(c.prompt, c.expected) for c in previous]
        self.prompts = [prompt for prompt, _ in self.cases]
        # An answer that names the fact is a short sentence: no need to let the model ramble on.
        self.max_new_tokens = min(48, max((len(tokenizer(expected).input_ids) for _, expected in self.cases), default=0) + 16)
        self.checks: list[dict[str, float]] = []
        self.trained_hits: list[bool] = []  # what the weights as trained answer: the last epoch's check

    def answers(self, model) -> list[str]:
        return generate_batch(model, self.tokenizer, self.device, self.prompts, self.max_new_tokens)

    def judged(self, answers: list[str], when: dict[str, float]) -> list[bool]:
        """Which cases these answers get right; logged and kept as a check."""
        hits = [answers_match(a, expected) for a, (_, expected) in zip(answers, self.cases, strict=True)]
        new, kept = sum(hits[: len(self.held_out)]), sum(hits[len(self.held_out) :])
        check = {**when, "held_out_answered": round(new / len(self.held_out), 4)}
        if self.previous:
            check["previous_kept"] = round(kept / len(self.previous), 4)
        self.checks.append(check)
        log.info(
            "training %s: %s, %d/%d held-out paraphrases answered, %d/%d earlier facts kept",
            self.user_id,
            ", ".join(f"{k} {v}" for k, v in when.items()),
            new,
            len(self.held_out),
            kept,
            len(self.previous),
        )
        return hits

    def epoch_due(self, epoch: float) -> bool:
        return epoch >= self.min_epochs  # not allowed to stop before: spare the generation

    def epoch_judged(self, epoch: float, answers: list[str]) -> bool:
        """Early stopping: stop once every held-out paraphrase is answered and the active version's facts still are."""
        self.trained_hits = self.judged(answers, {"epoch": epoch})
        return all(self.trained_hits)

    def learned_every_fact(self) -> bool:
        """Whether the update as trained answered every held-out paraphrase (True when no epoch was checked).

        One that never did ran to its last epoch without some fact in other
        words; shrinking it keeps the same held-out answers while losing what
        it learned beyond them (people's own rewordings fell from 8-9 of 10
        to 1-2 at half the update: benchmarks/README.md), so it is kept as
        trained."""
        return all(self.trained_hits[: len(self.held_out)])

    def scale_judged(self, scale: float, answers: list[str]) -> bool:
        hits = self.judged(answers, {"scale": scale})
        return self.learned_every_fact() and no_fact_lost(hits, self.trained_hits)

    def epoch_done(self, epoch: float, model) -> bool:
        return self.epoch_due(epoch) and self.epoch_judged(epoch, self.answers(model))

    def keeps_facts(self, model, scale: float) -> bool:
        return self.learned_every_fact() and self.scale_judged(scale, self.answers(model))


# ---- the job ------------------------------------------------------------------------- #


@dataclass(frozen=True)
class JobHooks:
    """How a caller follows and steers one job: its checkpoints, progress, a stop, the gate's start."""

    checkpoint_dir: Path | None = None
    progress: Callable[[StepReport], None] | None = None
    should_stop: Callable[[], bool] | None = None
    gating: Callable[[], None] | None = None
    cancelled: Callable[[], str | None] | None = None  # asked just before registering: a reason drops the version


@dataclass
class _Plan:
    """A job ready to train: see `JobRunner._plan`."""

    job: TrainingJob
    hooks: JobHooks
    examples: list[TrainingExample]  # the user's, thinned
    mixed: list[TrainingExample]  # with the anchors
    reference: Path | None
    reference_version: int | None
    facts: FactCheck
    warm: bool
    train_hooks: TrainHooks
    preferences: list[TrainingExample]  # held out, judged by the gate's preference suite (none: not trained on any)

    @property
    def warm_from(self) -> Path | None:
        return self.reference if self.warm else None


class JobRunner:
    """The kept base model and what every job uses with it: the registry, the gate, the anchors."""

    def __init__(
        self,
        registry: AdapterRegistry,
        base: BaseModelRef,
        model,
        tokenizer,
        device,
        cfg: TrainConfig,
        gate: Gate | None,
        anchors: AnchorSet | None = None,
        anchor_mix: AnchorMix | None = None,
        promotion: str = "auto",
        paraphraser: Paraphraser | None = None,
    ) -> None:
        self.registry, self.base, self.cfg, self.gate, self.anchors = registry, base, cfg, gate, anchors
        self.paraphraser = paraphraser  # None: train on the questions as the worker wrote them
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.anchor_mix = anchor_mix or AnchorMix.from_settings()
        self.promotion = promotion  # the configured mode; a user's own (trainer/review.py) wins

    def mode_of(self, user_id: str) -> str:
        """How a version of this user that passes the gate becomes active: auto or review."""
        return promotion_mode(self.registry, user_id, self.promotion)

    def run(self, job: TrainingJob, work_dir: Path, hooks: JobHooks = JobHooks()) -> Outcome:
        """Train, run the gate, register the version, promote or reject it (`hooks`: checkpoints, progress, a stop)."""
        plan = self._plan(job, hooks, work_dir / "reference")
        result = train_adapter(
            self.model,
            self.tokenizer,
            self.device,
            plan.mixed,
            self.cfg,
            work_dir / "adapter",
            hooks.checkpoint_dir,
            plan.train_hooks,
            init_adapter=plan.warm_from,
        )
        return self._conclude(plan, result)

    def run_batch(self, jobs: list[tuple[TrainingJob, JobHooks]], work_dir: Path) -> list[Outcome | Exception]:
        """Several users' jobs, trained together in one batched pass (trainer/multi.py), then each gated and registered.

        Per job, its Outcome, or the error that ended it (one user's failure
        or stop ends that user's job only); in the order given. A user must
        not appear twice.
        """
        if len({job.user_id for job, _ in jobs}) != len(jobs):
            raise AdaptloopError("a batch holds each user at most once (one version at a time per user)")
        plans: list[_Plan | Exception] = []
        for n, (job, hooks) in enumerate(jobs):
            try:
                plans.append(self._plan(job, hooks, work_dir / f"reference-{n}"))
            except Exception as exc:  # this user's data: the others go on
                plans.append(exc)
        ready = [p for p in plans if isinstance(p, _Plan)]
        runs = [
            UserRun(p.job.user_id, p.mixed, work_dir / f"adapter-{n}", p.hooks.checkpoint_dir, p.train_hooks, p.warm_from)
            for n, p in enumerate(ready)
        ]
        trained = dict(zip(map(id, ready), train_adapters(self.model, self.tokenizer, self.device, runs, self.cfg)))
        done = [(p, trained[id(p)]) for p in ready if isinstance(trained[id(p)], TrainResult)]
        gated = self._gate_together(done)
        outcomes: list[Outcome | Exception] = []
        for plan in plans:
            result = plan if isinstance(plan, Exception) else trained[id(plan)]
            if isinstance(result, Exception):
                outcomes.append(result)
                continue
            assert isinstance(plan, _Plan) and isinstance(result, TrainResult)
            try:
                report, seconds, result = gated[id(plan)]
                outcomes.append(self._register(plan, result, report, seconds, batch_users=len(ready)))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def _gate_together(
        self, done: list[tuple[_Plan, TrainResult]]
    ) -> dict[int, tuple[GateReport | None, float | None, TrainResult]]:
        """The gate on every trained candidate of a batch at once (`Gate.evaluate_batch`), each its share of the time;
        one rejected only for drift then alone at smaller scales (`_smaller_if_drifted`), on its own time."""
        if self.gate is None or not done:
            return {id(plan): (None, None, result) for plan, result in done}
        for plan, _ in done:
            if plan.hooks.gating is not None:
                plan.hooks.gating()
        started = time.perf_counter()
        reports = self.gate.evaluate_batch([self._candidate(plan, result) for plan, result in done])
        share = (time.perf_counter() - started) / len(done)
        gated = {}
        for (plan, result), report in zip(done, reports, strict=True):
            again = time.perf_counter()
            report, result = self._smaller_if_drifted(plan, result, report)
            gated[id(plan)] = (report, round(share + time.perf_counter() - again, 2), result)
        return gated

    def _candidate(self, plan: _Plan, result: TrainResult) -> Candidate:
        """What the gate judges; rated answers compared as this runner's KTO learned them (per token or summed)."""
        return Candidate(
            result.adapter_dir,
            as_cases(plan.job.held_out) + list(plan.job.explicit_cases),
            plan.reference,
            plan.facts.previous,
            as_cases(plan.examples),
            plan.preferences,
            rated_per_token=self.cfg.preference_losses.per_token,
        )

    def _plan(self, job: TrainingJob, hooks: JobHooks, reference_target: Path) -> _Plan:
        """What the job trains on and is judged by: its examples (thinned, anchors mixed in), the reference version
        (opened into `reference_target` when sealed), the facts early stopping and the shrink step ask about, and the
        warm start."""
        cfg, registry = self.cfg, self.registry
        reference, reference_version = reference_dir(registry, job.user_id, reference_target)
        warm = cfg.warm_start and same_shape(registry, job.user_id, reference_version, self.base, cfg)
        examples = replay_to_train(job.examples, cfg.replay_per_fact, warm)
        if self.paraphraser is not None:
            examples = self.paraphraser.augment(examples, job.held_out)
        mixed = self._with_anchors(examples)
        facts = FactCheck(
            self.tokenizer,
            self.device,
            job.user_id,
            [e for e in job.held_out if not e.rated_answer],
            learned_facts(registry, job.user_id, reference_version),
            cfg.min_epochs,
        )
        train_hooks = TrainHooks(
            progress=hooks.progress,
            should_stop=hooks.should_stop,
            epoch_done=facts.epoch_done if cfg.early_stopping and facts.held_out else None,
            keeps_facts=facts.keeps_facts if facts.held_out else None,
            questions=facts,
            seal=user_seal(registry.sealer, job.user_id),
        )
        preferences = judged_preferences(cfg.objective, examples, job.held_out)
        return _Plan(job, hooks, examples, mixed, reference, reference_version, facts, warm, train_hooks, preferences)

    def _conclude(self, plan: _Plan, result: TrainResult) -> Outcome:
        """The gate on the trained candidate, then `_register`."""
        report, gate_seconds = None, None
        if self.gate is not None:
            if plan.hooks.gating is not None:
                plan.hooks.gating()
            gate_started = time.perf_counter()
            report = self.gate.evaluate(**self._candidate(plan, result).arguments())
            report, result = self._smaller_if_drifted(plan, result, report)
            gate_seconds = round(time.perf_counter() - gate_started, 2)
        return self._register(plan, result, report, gate_seconds)

    def _smaller_if_drifted(self, plan: _Plan, result: TrainResult, report: GateReport) -> tuple[GateReport, TrainResult]:
        """A candidate rejected only for drifted general answers, gated again with its update scaled by each of
        `validation.drift_retry_scales` in turn: the first that passes, answering every held-out fact the trained
        update answered (as the shrink step asks), stays in the candidate's files (its scale in the manifest's
        `update_scaled`), else the update as trained is put back with the first verdict.

        The update's size sets both how far a way of answering moves and how many general answers move with it
        (benchmarks/README.md: a rejected preference version at 0.75 of its update passed the core suite)."""
        scales = self.gate.cfg.drift_retry_scales if self.gate is not None else ()
        if not scales or not report.only_drifted:
            return report, result
        weights = result.adapter_dir / ADAPTER_WEIGHTS
        trained = weights.read_bytes()
        for scale in scales:
            write_scaled_update(weights, trained, scale)
            again = self.gate.evaluate(**self._candidate(plan, result).arguments())
            kept = (again.facts_learned or 0.0) >= (report.facts_learned or 0.0)
            log.info(
                "%s: rejected for drift (%s); at %.2f of its update it %s",
                plan.job.user_id,
                "; ".join(report.reasons),
                scale,
                ("passes" if kept else f"passes but answers fewer facts ({again.facts_learned} < {report.facts_learned})")
                if again.passed
                else "fails too: " + "; ".join(again.reasons),
            )
            if again.passed and kept:
                return again, replace(result, shrunk_to=result.shrunk_to * scale)
        weights.write_bytes(trained)
        return report, result

    def _register(
        self, plan: _Plan, result: TrainResult, report: GateReport | None, gate_seconds: float | None, batch_users: int = 1
    ) -> Outcome:
        """The candidate's manifest (with the gate's verdict), the registered version, then promote or reject."""
        job, registry = plan.job, self.registry
        manifest = self._manifest(plan, result, report, gate_seconds, batch_users)
        cancelled = plan.hooks.cancelled() if plan.hooks.cancelled is not None else None
        if cancelled is not None:
            shutil.rmtree(result.adapter_dir, ignore_errors=True)
            if plan.hooks.checkpoint_dir is not None:
                remove_checkpoint(plan.hooks.checkpoint_dir)
            raise TrainingSkipped(cancelled)
        mode = self.mode_of(job.user_id)
        reviewed = mode == "review" or (report is not None and report.contradictions)
        if reviewed and report is not None and report.passed and self.gate is not None:
            self.gate.add_user_before(report, plan.reference)  # the reviewer sees the user's cases before and after
        info = registry.register(job.user_id, result.adapter_dir, manifest)
        if plan.hooks.checkpoint_dir is not None:
            remove_checkpoint(plan.hooks.checkpoint_dir)
        return Outcome(info, report, apply_decision(registry, info, report, job_id=job.request_id, mode=mode))

    def _with_anchors(self, examples: list[TrainingExample]) -> list[TrainingExample]:
        """The examples with the anchors mixed in, as many as the facts taught (at least the minimum), nearest to them.

        Rated answers do not count: they teach a way of answering (shorter, in metric units) that is meant to reach
        general prompts too, where a fact leaking there is a fault; anchors in proportion to them would hold every
        general answer to the base model's style."""
        if self.anchors is None or not self.anchors.prompts:
            return examples
        facts = [e for e in examples if not e.rated_answer]
        rated = [e.prompt for e in examples if e.rated_answer]
        chosen = choose_anchor_prompts(
            facts,
            self.anchors.prompts,
            self.anchor_mix,
            self.cfg.seed,
            self.anchors.nearest_first,
            avoid=rated,
            least_sure_first=partial(self.anchors.least_sure_first, self.model, self.tokenizer, self.device),
        )
        return mix_anchors(examples, self.anchors.answers(self.model, self.tokenizer, self.device, chosen), self.anchor_mix)

    def _manifest(
        self, plan: _Plan, result: TrainResult, report: GateReport | None, gate_seconds: float | None, batch_users: int = 1
    ) -> AdapterManifest:
        job, examples = plan.job, plan.examples
        metrics = {
            "train_seconds": round(result.seconds, 2),  # in a batch: this user's share of the shared steps
            "batch_users": batch_users,
            "steps": result.steps,
            "tokens": result.tokens,
            "final_loss": result.loss_curve[-1] if result.loss_curve else None,
            "gate_seconds": gate_seconds,
            # trained with the preference objective on this many pairs and rated answers (0: supervised only)
            "preference_examples": sum(e.preference for e in examples) if uses_preference(self.cfg.objective, examples) else 0,
            **(report.metrics() if report is not None else {}),
        }
        validation = None
        written = sum(e.wording == "model" for e in examples)  # trainer/paraphrase.py's, not in the dataset file
        if report is not None:
            suites = {name: suite.summary() for name, suite in report.suites.items()}
            validation = ValidationRecord(
                passed=report.passed,
                reasons=report.reasons,
                reference_version=plan.reference_version,
                suites=suites,
                contradictions=report.contradictions,
            )
        return AdapterManifest(
            request_id=job.request_id,
            trigger=job.trigger,
            trained_at=datetime.now(UTC),
            base_model=self.base.model_id,
            base_model_sha256=self.base.sha256,
            dataset=DatasetInfo(
                uri=job.dataset_uri,
                sha256=job.dataset_sha256,
                train_count=len(examples),
                replay_thinned=len(job.examples) - len(examples) + written,
                model_paraphrases=written,
                anchor_count=len(plan.mixed) - len(examples),
            ),
            lineage=job.lineage,
            hyperparameters=asdict(self.cfg),
            started_from_version=plan.reference_version if plan.warm else None,
            resumed_from_step=result.resumed_from_step,
            metrics=metrics,
            loss_curve=result.loss_curve,
            loss_curves=result.loss_curves,
            early_stopping=EarlyStopping(
                stopped_after_epoch=result.stopped_after_epoch,
                stopped_by=result.stopped_by,
                checks=plan.facts.checks,
                update_scaled=result.shrunk_to,
            ),
            held_out=[Case(prompt=c.prompt, expected=c.expected) for c in as_cases(job.held_out)],
            held_out_preferences=[PreferenceCase.of(e) for e in plan.preferences],
            facts=[Fact(**f) for f in report.facts()] if report is not None else [],
            validation=validation,
        )


def validate_adapter(
    *,
    gate: Gate,
    registry: AdapterRegistry,
    store: ArtifactStore | None,
    tests_dir: str,
    user_id: str,
    adapter: Path,
    baseline: Path | None,
    job_id: str | None = None,
    version: int | None = None,
) -> GateReport:
    """Run the gate on an existing adapter (offline, or for a validate command) and log the result.

    User cases: the held-out slice in the adapter's manifest plus the user's
    explicit cases; preference pairs: the ones its manifest says the gate
    asked (trainer/preference.py), its rated answers compared per token or
    summed as its recorded training config learned them. Baseline: `baseline`, else the user's active version, else
    the base model. Nothing is promoted.
    """
    manifest = verify_adapter_dir(adapter) or AdapterManifest()
    cases = [TestCase(c.prompt, c.expected) for c in manifest.held_out]
    cases += user_cases(store, tests_dir, user_id) if store is not None else []
    with scratch_dir("adaptloop-validate-") as tmp:  # opened files, when sealed at rest
        if baseline is not None:
            compared_with: Path | None = registry.plain_dir(baseline, Path(tmp) / "baseline")
        else:
            compared_with, active = reference_dir(registry, user_id, Path(tmp) / "baseline")
            baseline = registry.version_dir(user_id, active) if active is not None else None
        candidate = registry.plain_dir(Path(adapter), Path(tmp) / "candidate")
        preferences = [p.as_example() for p in manifest.held_out_preferences]
        per_token = manifest.hyperparameters.rated_gain_per_token()  # judged as it was trained, whatever today's setting
        report = gate.evaluate(candidate, cases, compared_with, preferences=preferences, rated_per_token=per_token)
    registry.log_validation(
        user_id,
        version if version is not None else (manifest.version or None),
        report.to_dict(),
        kind="validate",
        adapter=str(adapter),
        baseline=str(baseline) if baseline else None,
        job_id=job_id,
    )
    return report


def runner_from_settings(
    settings: Settings, base: BaseModelRef, model, tokenizer, device, *, with_gate: bool = True, **train_overrides
) -> JobRunner:
    """The job runner the settings describe, around an already loaded base model."""
    gate = GateSpec.from_settings(settings).build(model, tokenizer, device, base.sha256) if with_gate else None
    return JobRunner(
        AdapterRegistry.from_settings(settings),
        base,
        model,
        tokenizer,
        device,
        TrainConfig.from_settings(settings, **train_overrides),
        gate,
        AnchorSet.from_settings(settings, base.sha256, model),
        AnchorMix.from_settings(settings),
        settings.promotion.mode,
        paraphraser_from_settings(settings, model, tokenizer, device),
    )


def paraphraser_from_settings(settings: Settings, model, tokenizer, device) -> Paraphraser | None:
    """The base model's paraphrases of taught questions (trainer/paraphrase.py), when `training.model_paraphrases`;
    the embedding model is loaded on its first use."""
    t, embedding_model = settings.training, settings.model.embedding_model
    if t.model_paraphrases <= 0:
        return None
    keep = ParaphraseFilter(min_similarity=t.paraphrase_min_similarity)
    similarity = lambda texts, others: load_embedder(embedding_model).similarity(texts, others)  # noqa: E731
    return Paraphraser.on_model(model, tokenizer, device, similarity, t.model_paraphrases, t.seed, keep)


def read_batch_file(path: Path) -> list[tuple[str, Path]]:
    """`train --batch FILE.jsonl`: (user_id, dataset path) per line; relative paths from the file's folder; each user once."""
    from core.errors import InvalidMessage
    from schemas.decode import decode
    from schemas.training import BatchEntry

    entries: list[tuple[str, Path]] = []
    for number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = decode(BatchEntry, line, max_bytes=1 << 16)
        except InvalidMessage as exc:
            raise InvalidMessage(f"{path}:{number}: {exc.reason}") from None
        data = Path(entry.data_path) if Path(entry.data_path).is_absolute() else Path(path).parent / entry.data_path
        if not data.is_file():
            raise InvalidMessage(f"{path}:{number}: no dataset file at {data}")
        if entry.user_id in {user for user, _ in entries}:
            raise InvalidMessage(f"{path}:{number}: {entry.user_id} is already in the batch (one version per user at a time)")
        entries.append((entry.user_id, data))
    if not entries:
        raise InvalidMessage(f"{path}: no users")
    return entries


def _file_job(settings: Settings, registry: AdapterRegistry, user_id: str, data_path: Path, hold_out: bool, with_gate: bool):
    """The TrainingJob for a dataset file (TrainingSkipped when it holds nothing new): what `train` trains."""
    from core.storage import sha256_bytes
    from schemas.dataset import split_holdout
    from trainer.data import read_jsonl

    examples = read_jsonl(data_path)
    reason = skip_reason(registry, user_id, examples)
    if reason is not None:
        raise TrainingSkipped(reason)
    train, held_out = split_holdout(examples, settings.training.seed) if hold_out else (examples, [])
    explicit = (
        user_cases(open_store(settings.storage_root, settings.storage.encryption), settings.validation.user_tests_dir, user_id)
        if with_gate
        else []
    )
    uri, sha256 = Path(data_path).resolve().as_uri(), sha256_bytes(Path(data_path).read_bytes())
    return TrainingJob(user_id, train, held_out, uri, sha256, explicit_cases=explicit)


def _loaded_runner(settings: Settings, epochs: int | None, with_gate: bool) -> JobRunner:
    from trainer.model import load_base, resolve_base_model

    base = resolve_base_model(settings.model.base_model, settings.model.gguf_file, settings.cache_dir)
    model, tokenizer, device = load_base(base, settings.model.dtype, settings.training.quantization)
    overrides = {"epochs": epochs} if epochs else {}
    return runner_from_settings(settings, base, model, tokenizer, device, with_gate=with_gate, **overrides)


def train_file(
    settings: Settings, user_id: str, data_path: Path, *, epochs: int | None = None, hold_out: bool = True, with_gate: bool = True
) -> Outcome:
    """`adaptloop train`: one version from a dataset file, with a progress bar; the held-out split as `schemas.dataset` splits."""
    registry = AdapterRegistry.from_settings(settings)
    job = _file_job(settings, registry, user_id, data_path, hold_out, with_gate)  # skipped before the model is even loaded
    runner = _loaded_runner(settings, epochs, with_gate)
    bar, update = progress_bar()
    try:
        with tempfile.TemporaryDirectory(prefix="adaptloop-train-") as tmp:
            return runner.run(job, Path(tmp), JobHooks(progress=update))
    finally:
        bar.close()


def train_batch_file(
    settings: Settings,
    entries: list[tuple[str, Path]],
    *,
    epochs: int | None = None,
    hold_out: bool = True,
    with_gate: bool = True,
) -> list[tuple[str, Outcome | Exception]]:
    """`adaptloop train --batch`: every listed user's next version in one batched pass, each gated; per user its
    Outcome or what stopped it (TrainingSkipped, a bad dataset, a failure), in the file's order."""
    registry = AdapterRegistry.from_settings(settings)
    answers: dict[str, Outcome | Exception] = {}
    jobs: list[tuple[TrainingJob, JobHooks]] = []
    for user_id, path in entries:
        try:
            jobs.append((_file_job(settings, registry, user_id, path, hold_out, with_gate), JobHooks()))
        except Exception as exc:  # this user only
            answers[user_id] = exc
    if jobs:
        runner = _loaded_runner(settings, epochs, with_gate)
        bar, update = progress_bar()
        totals: dict[str, tuple[int, int]] = {}

        def follow(user_id: str) -> Callable[[StepReport], None]:
            def step(report: StepReport) -> None:
                totals[user_id] = (report.step, report.total)
                done, total = (sum(t[i] for t in totals.values()) for i in (0, 1))
                update(StepReport(done, total, report.loss, report.user_loss, report.anchor_kl))

            return step

        jobs = [(job, JobHooks(progress=follow(job.user_id))) for job, _ in jobs]
        try:
            with tempfile.TemporaryDirectory(prefix="adaptloop-train-") as tmp:
                for (job, _), outcome in zip(jobs, runner.run_batch(jobs, Path(tmp))):
                    answers[job.user_id] = outcome
        finally:
            bar.close()
    return [(user_id, answers[user_id]) for user_id, _ in entries]
