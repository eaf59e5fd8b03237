"""One training job from dataset to decision, shared by the CLI and the trainer service.

    adaptloop train --user-id alice --data-path alice.jsonl [--epochs 8]
    adaptloop validate --adapter DIR --user-id alice [--baseline DIR]
    adaptloop ask --user-id alice "What is my dog's name?" [--version N]

`train` holds out one paraphrase of every taught item that has several
(examples sharing an event_id, else the same response) as validation cases,
trains on the rest, runs the validation gate (trainer/gate.py) on the
candidate, registers it with a manifest that records the gate's result, and
then promotes it (the active pointer swaps atomically) or rejects it (the
active version stays). Every gate result goes to the validation log.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from adaptloop.errors import StorageError
from adaptloop.storage import ArtifactStore, sha256_bytes
from schemas.training import TrainingExample
from streams.dataset import split_holdout
from trainer.anchors import AnchorMix, AnchorSet, choose_anchor_prompts, mix_anchors
from trainer.data import read_jsonl, thin_replay
from trainer.model import BaseModelRef, load_base, resolve_base_model
from trainer.gate import Gate, GateReport, GateSpec, parse_cases
from trainer.registry import AdapterRegistry, VersionInfo, file_sha256
from trainer.scoring import TestCase, answers_match
from trainer.train import TrainConfig, generate, generate_batch, remove_checkpoint, train_adapter

log = logging.getLogger("adaptloop.trainer")


def user_cases(store: ArtifactStore, tests_dir: str, user_id: str) -> list[TestCase]:
    """The user's explicit test cases (`<tests_dir>/user_<id>.jsonl` in the store), if any."""
    relative = f"{tests_dir.strip('/')}/user_{user_id}.jsonl"
    if not store.exists(relative):
        return []
    return parse_cases(store.read_bytes(relative).decode("utf-8"), store.uri(relative))


def as_cases(examples: list[TrainingExample]) -> list[TestCase]:
    return [TestCase(e.prompt, e.response) for e in examples]


@dataclass(frozen=True)
class Outcome:
    """A trained version and what the gate made of it."""

    info: VersionInfo
    report: GateReport | None
    decision: str  # promoted | rejected | candidate (no gate)


def reference_dir(registry: AdapterRegistry, user_id: str) -> tuple[Path | None, int | None]:
    """The adapter a candidate is compared with: the user's active version, verified; None = the base model."""
    active = registry.active(user_id)
    if active is None:
        return None, None
    try:
        return registry.verify(user_id, active).path, active
    except StorageError as exc:  # never load a tampered adapter, not even as a reference
        log.error("active adapter unusable as the reference, comparing with the base model: %s", exc)
        return None, None


def learned_facts(registry: AdapterRegistry, user_id: str, version: int | None) -> list[TestCase]:
    """The facts `version` answered at its own validation (its manifest's `facts`); forgetting is measured on them."""
    if version is None:
        return []
    facts = registry.info(user_id, version).manifest.get("facts", [])
    return [TestCase(f["prompt"], f["expected"]) for f in facts if f.get("learned")]


def same_shape(registry: AdapterRegistry, user_id: str, version: int | None, base: BaseModelRef, cfg: TrainConfig) -> bool:
    """Whether `version` can be a warm start for this run: same base model, same LoRA rank, alpha, modules and layers."""
    if version is None:
        return False
    manifest = registry.info(user_id, version).manifest
    shape = manifest.get("hyperparameters", {})
    same = (manifest.get("base_model") == base.model_id and manifest.get("base_model_sha256") == base.sha256
            and (shape.get("r"), shape.get("alpha"), shape.get("top_layer_share", 1.0)) == (cfg.r, cfg.alpha, cfg.top_layer_share)
            and sorted(shape.get("target_modules", [])) == sorted(cfg.target_modules))  # fmt: skip
    if not same:
        log.info("version %s of %s has another base model or LoRA shape: training from zero", version, user_id)
    return same


def apply_decision(registry: AdapterRegistry, info: VersionInfo, report: GateReport | None = None, *, job_id: str | None = None) -> str:
    """Promote or reject a registered version by its recorded gate result; idempotent (safe to redo after a crash)."""
    validation = info.manifest.get("validation")
    if validation is None:
        return "candidate"
    user_id, version = info.user_id, info.version
    done = {e["status"] for e in registry.history(user_id) if e["version"] == version}
    if not done & {"active", "rejected"}:
        if not any(r.get("version") == version and r.get("kind") == "gate" for r in registry.validation_results(user_id)):
            record = report.to_dict() if report is not None else validation
            registry.log_validation(user_id, version, record, kind="gate", request_id=info.manifest.get("request_id"), job_id=job_id)
        if validation["passed"]:
            registry.activate(user_id, version, reason="passed the validation gate")
        else:
            registry.mark(user_id, version, "rejected", reasons=validation["reasons"])
    return "promoted" if validation["passed"] else "rejected"


def _progress_bar(total_hint: int = 0):
    from tqdm import tqdm

    bar = tqdm(total=total_hint or None, desc="training", unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(step: int, total: int, loss: float) -> None:
        if bar.total != total:
            bar.total = total
        bar.n = step
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.refresh()

    return bar, update


def _progress_log(user_id: str):
    """Progress for a service without a terminal: one log line per tenth of the steps."""

    def update(step: int, total: int, loss: float) -> None:
        if step == total or step % max(1, total // 10) == 0:
            log.info("training %s: step %d/%d, loss %.3f", user_id, step, total, loss)

    return update


def no_fact_lost(hits: list[bool], trained_hits: list[bool]) -> bool:
    """Whether a shrunk update answers every case the update as trained answered (every case, when that is unknown)."""
    if not trained_hits:
        return all(hits)
    return all(hit or not trained for hit, trained in zip(hits, trained_hits, strict=True))


def train_version(
    *,
    registry: AdapterRegistry,
    base: BaseModelRef,
    model,
    tokenizer,
    device,
    user_id: str,
    examples: list[TrainingExample],
    held_out: list[TrainingExample],
    cfg: TrainConfig,
    work_dir: Path,
    dataset_uri: str,
    dataset_sha256: str,
    gate: Gate | None,
    explicit_cases: list[TestCase] = (),
    anchors: AnchorSet | None = None,
    anchor_mix: AnchorMix = AnchorMix(),
    trigger: str = "manual",
    request_id: str | None = None,
    lineage: list | None = None,
    checkpoint_dir: Path | None = None,
    show_progress: bool = True,
    should_stop=None,
) -> Outcome:
    """Train, run the gate, register the version, promote or reject it. Shared by CLI and service.

    The gate runs before the version is registered, so its result is part of
    the immutable manifest; a crash after registering is finished by
    `apply_decision` when the request comes again.
    """
    bar, update = _progress_bar() if show_progress else (None, _progress_log(user_id))
    given = len(examples)
    examples = thin_replay(examples, cfg.replay_per_fact)
    mixed = examples
    if anchors is not None and anchors.prompts:
        chosen = choose_anchor_prompts(examples, anchors.prompts, anchor_mix, cfg.seed, anchors.nearest_first)
        mixed = mix_anchors(examples, anchors.answers(model, tokenizer, device, chosen), anchor_mix)
    reference, reference_version = reference_dir(registry, user_id)
    previous_facts = learned_facts(registry, user_id, reference_version)
    start_from = reference if cfg.warm_start and same_shape(registry, user_id, reference_version, base, cfg) else None
    checks: list[dict] = []
    cases = [(e.prompt, e.response) for e in held_out] + [(c.prompt, c.expected) for c in previous_facts]
    # An answer that names the fact is a short sentence: no need to let the model ramble on.
    longest = max((len(tokenizer(expected).input_ids) for _, expected in cases), default=0)

    trained_hits: list[bool] = []  # what the weights as trained answer: the last epoch's check

    def answered(peft_model, when) -> list[bool]:
        """Which held-out paraphrases and earlier facts the model answers (logged, and kept for the manifest)."""
        answers = generate_batch(peft_model, tokenizer, device, [prompt for prompt, _ in cases], min(48, longest + 16))
        hits = [answers_match(a, expected) for a, (_, expected) in zip(answers, cases)]
        new, kept = sum(hits[: len(held_out)]), sum(hits[len(held_out) :])
        checks.append({**when, "held_out_answered": round(new / len(held_out), 4),
                       **({"previous_kept": round(kept / len(previous_facts), 4)} if previous_facts else {})})  # fmt: skip
        log.info("training %s: %s, %d/%d held-out paraphrases answered, %d/%d earlier facts kept",
                 user_id, ", ".join(f"{k} {v}" for k, v in when.items()), new, len(held_out), kept, len(previous_facts))  # fmt: skip
        return hits

    def taught_and_kept(epoch: int, peft_model) -> bool:
        """Early stopping: stop once every held-out paraphrase is answered and the active version's facts still are."""
        if epoch < cfg.min_epochs:
            return False  # not allowed to stop yet: spare the generation
        trained_hits[:] = answered(peft_model, {"epoch": epoch})
        return all(trained_hits)

    def keeps_facts(peft_model, scale: float) -> bool:
        return no_fact_lost(answered(peft_model, {"scale": scale}), trained_hits)

    early = taught_and_kept if cfg.early_stopping and held_out else None
    try:
        result = train_adapter(
            model, tokenizer, device, mixed, cfg, work_dir / "adapter", checkpoint_dir, progress=update,
            should_stop=should_stop, epoch_done=early, init_adapter=start_from, keeps_facts=keeps_facts if held_out else None,
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    report = None
    if gate is not None:
        report = gate.evaluate(result.adapter_dir, as_cases(held_out) + list(explicit_cases), reference,
                               previous_facts=previous_facts, taught=as_cases(examples))  # fmt: skip
    manifest = {
        "base_model": base.model_id,
        "base_model_sha256": base.sha256,
        "dataset": {"uri": dataset_uri, "sha256": dataset_sha256, "train_count": len(examples), "replay_thinned": given - len(examples),
                    "anchor_count": len(mixed) - len(examples)},
        "held_out": [{"prompt": e.prompt, "expected": e.response} for e in held_out],
        "lineage": lineage or [],
        "hyperparameters": asdict(cfg),
        "metrics": {
            "train_seconds": round(result.seconds, 2),
            "steps": result.steps,
            "tokens": result.tokens,
            "final_loss": result.loss_curve[-1] if result.loss_curve else None,
            **(report.metrics() if report is not None else {}),
        },
        "loss_curve": result.loss_curve,
        "resumed_from_step": result.resumed_from_step,
        "started_from_version": reference_version if start_from is not None else None,
        "early_stopping": {"stopped_after_epoch": result.stopped_after_epoch, "stopped_by": result.stopped_by, "checks": checks,
                           "update_scaled": result.shrunk_to},
        "trigger": trigger,
        "request_id": request_id,
        "trained_at": datetime.now(timezone.utc).isoformat(),
    }
    if report is not None:
        manifest["facts"] = report.facts()
        manifest["validation"] = {"passed": report.passed, "reasons": report.reasons, "reference_version": reference_version,
                                  "suites": {name: suite.summary() for name, suite in report.suites.items()}}  # fmt: skip
    info = registry.register(user_id, result.adapter_dir, manifest)
    if checkpoint_dir is not None:
        remove_checkpoint(checkpoint_dir)
    return Outcome(info, report, apply_decision(registry, info, report, job_id=request_id))


def train_from_file(
    *,
    registry: AdapterRegistry,
    base_model: str,
    gguf_file: str | None,
    cache_dir: Path,
    dtype: str,
    user_id: str,
    data_path: Path,
    cfg: TrainConfig,
    gate: GateSpec | None,
    store: ArtifactStore | None = None,
    hold_out: bool = True,
    anchor_prompts: list[str] = (),
    anchor_mix: AnchorMix = AnchorMix(),
    embedding_model: str | None = None,
) -> Outcome:
    import tempfile

    examples = read_jsonl(data_path)
    train, held_out = split_holdout(examples, cfg.seed) if hold_out else (examples, [])
    base = resolve_base_model(base_model, gguf_file, cache_dir)
    model, tokenizer, device = load_base(base, dtype)
    explicit = user_cases(store, gate.user_tests_dir, user_id) if gate is not None and store is not None else []
    anchors = AnchorSet(list(anchor_prompts), cache_dir, base.sha256, embedding_model) if anchor_prompts else None
    with tempfile.TemporaryDirectory(prefix="adaptloop-train-") as tmp:
        return train_version(
            registry=registry, base=base, model=model, tokenizer=tokenizer, device=device, user_id=user_id,
            examples=train, held_out=held_out, cfg=cfg, work_dir=Path(tmp),
            dataset_uri=Path(data_path).resolve().as_uri(), dataset_sha256=sha256_bytes(Path(data_path).read_bytes()),
            gate=gate.build(model, tokenizer, device, base.sha256) if gate is not None else None, explicit_cases=explicit,
            anchors=anchors, anchor_mix=anchor_mix,
        )  # fmt: skip


def verified_adapter(path: Path) -> dict:
    """Check a PEFT adapter directory before anything loads it; return its manifest ({} when it has none).

    A registry version carries a manifest with every file's sha256: a mismatch is refused.
    """
    path = Path(path)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise StorageError(f"{path} is not a PEFT adapter directory: {name} is missing")
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return {}
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise StorageError(f"{manifest_path} is corrupt: {exc}") from None
    for name, expected in manifest.get("files", {}).items():
        actual = file_sha256(path / name) if (path / name).is_file() else "missing"
        if actual != expected:
            raise StorageError(f"{path / name}: sha256 mismatch (manifest {expected[:12]}, file {actual[:12]}); refusing to load it")
    return manifest


def validate_adapter(
    *, gate: Gate, registry: AdapterRegistry, store: ArtifactStore | None, tests_dir: str, user_id: str,
    adapter: Path, baseline: Path | None, job_id: str | None = None, version: int | None = None,
) -> GateReport:  # fmt: skip
    """Run the gate on an existing adapter (offline, or for a validate command) and log the result.

    User cases: the held-out slice in the adapter's manifest plus the user's
    explicit cases. Baseline: `baseline`, else the user's active version, else
    the base model. Nothing is promoted.
    """
    manifest = verified_adapter(adapter)
    if baseline is not None:
        verified_adapter(baseline)
    else:
        baseline, _ = reference_dir(registry, user_id)
    cases = [TestCase(c["prompt"], c["expected"]) for c in manifest.get("held_out", [])]
    cases += user_cases(store, tests_dir, user_id) if store is not None else []
    report = gate.evaluate(Path(adapter), cases, baseline)
    registry.log_validation(user_id, version if version is not None else manifest.get("version"), report.to_dict(),
                            kind="validate", adapter=str(adapter), baseline=str(baseline) if baseline else None,
                            job_id=job_id)  # fmt: skip
    return report


def ask(
    *, registry: AdapterRegistry, base_model: str, gguf_file: str | None, cache_dir: Path, dtype: str,
    user_id: str, prompt: str, version: int | None,
) -> tuple[str, int | None]:  # fmt: skip
    """Answer with the base model plus the user's active (or named) adapter; (answer, version)."""
    base = resolve_base_model(base_model, gguf_file, cache_dir)
    model, tokenizer, device = load_base(base, dtype)
    chosen = version if version is not None else registry.active(user_id)
    if chosen is None:
        return generate(model, tokenizer, device, prompt), None
    info = registry.verify(user_id, chosen)  # refuses a tampered adapter before loading it
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(model, str(info.path))
    return generate(adapted, tokenizer, device, prompt), chosen
