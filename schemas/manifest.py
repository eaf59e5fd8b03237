"""The adapter manifest: `manifest.json` in every registered version, the record of how it came to be.

The trainer fills it in, the registry adds the files' sha256 and the version
number when it registers the adapter, and every reader (the gate's next run,
warm starts, the API, `adaptloop history`, the report) reads it through this
model. A manifest is written once and never changed.

Versions: `manifest_version` 2 is what this code writes; manifests written
before it had no such field and load as version 1 (their fields are the same,
only `loss_curves` and `metrics.gate_seconds` are new). Unknown fields, from a
newer adaptloop, are ignored when reading.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from schemas.training import ExampleSource, OffsetRange, TrainingExample

MANIFEST_VERSION = 2
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class _Record(BaseModel):
    """Frozen; fields a newer writer added are ignored on read (manifests outlive the code that wrote them)."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class Case(_Record):
    """A prompt and the answer it should get."""

    prompt: str
    expected: str


class PreferenceCase(_Record):
    """A held-out pair (a correction and the answer it corrected) or rated answer the gate's preference suite asked."""

    prompt: str
    response: str
    source: ExampleSource = "manual"
    rejected: str | None = None
    rating: float | None = None

    @classmethod
    def of(cls, example: TrainingExample) -> PreferenceCase:
        return cls(
            prompt=example.prompt,
            response=example.response,
            source=example.source,
            rejected=example.rejected,
            rating=example.rating,
        )

    def as_example(self) -> TrainingExample:
        return TrainingExample(
            prompt=self.prompt, response=self.response, source=self.source, rejected=self.rejected, rating=self.rating
        )


class Fact(Case):
    """A user case and whether this version answered it at its own validation."""

    learned: bool


class DatasetInfo(_Record):
    uri: str = ""
    sha256: str = ""
    train_count: int = 0
    replay_thinned: int = Field(
        0, description="replayed examples left out (`training.replay_per_fact` reminders kept per earlier fact)"
    )
    model_paraphrases: int = Field(0, description="taught questions reworded by the base model (trainer/paraphrase.py)")
    anchor_count: int = 0


class Hyperparameters(_Record):
    """The training config the version was trained with; the LoRA shape decides whether it can be a warm start."""

    model_config = ConfigDict(frozen=True, extra="allow")

    r: int | None = None
    alpha: int | None = None
    target_modules: list[str] = Field(default_factory=list)
    top_layer_share: float = 1.0

    def lora_shape(self) -> tuple:
        return self.r, self.alpha, self.top_layer_share, tuple(sorted(self.target_modules))

    def rated_gain_per_token(self) -> bool | None:
        """Whether the version's KTO learned rated answers per token (its gate compares them so); None: not recorded.

        A config recorded without `preference_kto_token_beta` was trained before per-token KTO existed: summed.
        """
        if self.r is None:
            return None
        return float((self.model_extra or {}).get("preference_kto_token_beta") or 0) > 0


class VersionMetrics(_Record):
    """Training and gate figures; None where not measured (no gate, old manifests)."""

    train_seconds: float | None = None
    steps: int | None = None
    tokens: int | None = None
    final_loss: float | None = None
    gate_seconds: float | None = None
    batch_users: int | None = None  # users trained together in the version's batch (1: alone)
    preference_examples: int | None = None  # pairs and rated answers the preference objective trained on (0: none)
    core_score: float | None = None
    core_reference_score: float | None = None
    user_score: float | None = None
    previous_score: float | None = None
    preference_score: float | None = None  # share of held-out rated pairs where the liked answer is preferred
    facts_learned: float | None = None
    retention: float | None = None
    forgetting: float | None = None

    def numbers(self) -> dict[str, float]:
        """The measured figures as floats (what lifecycle events carry)."""
        return {name: float(value) for name, value in self.model_dump().items() if value is not None}


class SuiteSummary(_Record):
    score: float
    passed: bool
    threshold: float
    reference_score: float | None = None
    cases: int = 0


class Contradiction(_Record):
    """A training example that gives a general question another answer than the base model's confident one."""

    prompt: str
    taught: str = Field(description="the answer the example teaches")
    base_answer: str = Field(description="the base model's answer (its first sentence)")
    term: str = Field(description="the base answer's fact the example does not name")
    confidence: float = Field(description="the base model's probability of that fact's first token")


class ValidationRecord(_Record):
    """The gate's verdict, recorded before the version is registered (so a crash after registering is finished by it)."""

    passed: bool
    reasons: list[str] = Field(default_factory=list)
    reference_version: int | None = None
    suites: dict[str, SuiteSummary] = Field(default_factory=dict)
    contradictions: list[Contradiction] = Field(
        default_factory=list, description="a passed candidate with any goes to review, also in auto mode"
    )


class EarlyStopping(_Record):
    stopped_after_epoch: int | float | None = Field(
        None, description="epochs done when training stopped (2.5: halfway through the third, training.checks_per_epoch)"
    )
    stopped_by: str | None = Field(None, description="'early stopping' or 'time budget'; None: every epoch ran")
    checks: list[dict[str, float]] = Field(
        default_factory=list, description="each early-stopping check's and shrink step's fact check"
    )
    update_scaled: float = Field(
        1.0, description="the scale the update was shrunk to after training (the shrink step, a drift retry at the gate)"
    )


class AdapterManifest(_Record):
    manifest_version: int = 1
    # Filled in by the registry.
    user_id: str = ""
    version: int = 0
    files: dict[str, str] = Field(default_factory=dict, description="sha256 of every adapter file")
    sealed_files: dict[str, str] = Field(
        default_factory=dict, description="sha256 of every adapter file as stored, when encrypted at rest (integrity on disk)"
    )
    registered_at: datetime | None = None
    # The job.
    request_id: str | None = None
    trigger: str | None = None
    trained_at: datetime | None = None
    base_model: str = ""
    base_model_sha256: str = ""
    dataset: DatasetInfo = DatasetInfo()
    lineage: list[OffsetRange] = Field(default_factory=list, description="the events behind the dataset")
    hyperparameters: Hyperparameters = Hyperparameters()
    started_from_version: int | None = Field(None, description="the warm start, if any")
    resumed_from_step: int = 0
    # What happened.
    metrics: VersionMetrics = VersionMetrics()
    loss_curve: list[float] = Field(default_factory=list, description="the loss the optimizer saw, per step")
    loss_curves: dict[str, list[float | None]] = Field(
        default_factory=dict,
        description="its parts per step: 'user' (cross-entropy on the user's answers), 'anchor_kl'; None where a batch had no such row",
    )
    early_stopping: EarlyStopping = EarlyStopping()
    held_out: list[Case] = Field(default_factory=list, description="the held-out cases the gate asked")
    held_out_preferences: list[PreferenceCase] = Field(
        default_factory=list, description="the held-out pairs and rated answers its preference suite asked"
    )
    facts: list[Fact] = Field(default_factory=list, description="the user cases and whether each was answered")
    validation: ValidationRecord | None = None

    @property
    def weights_sha256(self) -> str | None:
        return self.files.get(ADAPTER_WEIGHTS)

    def learned_facts(self) -> list[Fact]:
        """What the next version must not forget."""
        return [fact for fact in self.facts if fact.learned]

    def missed_cases(self) -> list[str]:
        """The user-suite questions this version does not answer right (what active learning may ask about)."""
        return [fact.prompt for fact in self.facts if not fact.learned]

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> AdapterManifest:
        return cls.model_validate_json(data)
