"""Typed, frozen settings: one YAML file, then environment overrides.

Load once at the edge with `load_settings()`; each component's plain config
is built from the result by its own `from_settings()` (beside the config),
so this module holds every default and every name derived from the settings
(topics Faust derives, the token file, the worker's files), each once.

Where the file comes from, first match wins:
  1. the `path` argument (the CLI's `--config PATH`),
  2. the `ADAPTLOOP_CONFIG` environment variable,
  3. `config/adapter_retrain.yaml` in the working directory,
  4. the default shipped with the package.

Overrides: a top-level key `x` is overridden by `ADAPTLOOP_X`, a nested one by
`ADAPTLOOP_SECTION__KEY` (for example `ADAPTLOOP_KAFKA__CLIENT_ID`); lists and
mappings are given as JSON. `KAFKA_BOOTSTRAP_SERVERS`, when set, wins over both,
and then no command starts a local broker.
"""

from __future__ import annotations

import contextvars
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from core.errors import ConfigError
from core.storage import atomic_write, inside_root, is_local, local_path

CONFIG_ENV = "ADAPTLOOP_CONFIG"
BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"
ENV_PREFIX = "ADAPTLOOP_"
DEFAULT_CONFIG_NAME = "adapter_retrain.yaml"

Schedule = Literal["nightly", "on-demand", "threshold", "continuous"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class _Section(BaseModel):
    """A frozen settings section that rejects unknown keys (so typos are named)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- #
# Kafka
# --------------------------------------------------------------------------- #


class LocalBrokerSettings(_Section):
    """The single-node KRaft broker that `adaptloop kafka up` runs from Maven jars."""

    port: int = Field(9092, ge=1, le=65535, description="client (PLAINTEXT) port")
    data_dir: Path | None = Field(None, description="log and metadata dir; default <cache_dir>/kafka/broker-<port>")
    kafka_version: str = Field("4.1.1", pattern=r"^4\.\d+\.\d+$", description="org.apache.kafka:kafka_2.13 version")
    heap: str = Field("512m", pattern=r"^\d+[mg]$", description="JVM -Xmx")
    startup_timeout_s: float = Field(90.0, gt=0, description="how long `kafka up` waits for the broker to answer")


class KafkaSettings(_Section):
    bootstrap_servers: str = Field(
        "127.0.0.1:9092", min_length=1, description="host:port[,host:port...]; KAFKA_BOOTSTRAP_SERVERS wins over it"
    )
    client_id: str = Field("adaptloop", description="client.id of every Kafka client")
    security_protocol: SecurityProtocol = Field("PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    sasl_mechanism: SaslMechanism | None = Field(None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL_* protocols)")
    sasl_username: str | None = Field(None, description="SASL user")
    sasl_password: SecretStr | None = Field(None, description="SASL password: never printed; prefer the environment variable")
    ssl_cafile: Path | None = Field(None, description="CA certificate(s) to trust (PEM)")
    ssl_certfile: Path | None = Field(None, description="client certificate (PEM), for mutual TLS")
    ssl_keyfile: Path | None = Field(None, description="client key (PEM), for mutual TLS")
    max_event_bytes: int = Field(64 * 1024, ge=1024, description="larger input messages go to the DLQ")
    session_timeout_s: float = Field(
        45.0,
        ge=6,
        le=300,
        description="consumer-group session timeout of workers and trainers: how soon a crashed one's partitions move",
    )
    local_broker: LocalBrokerSettings = LocalBrokerSettings()

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL_"):
            missing = [k for k in ("sasl_mechanism", "sasl_username", "sasl_password") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"security_protocol {self.security_protocol} needs {', '.join(missing)}")
        return self


MIN_TOPIC_MESSAGE_BYTES = 4096  # a topic's smallest max.message.bytes: a record batch's ~1 KiB framing and an event


class TopicSpec(_Section):
    name: str = Field(description="the topic's name")
    partitions: int = Field(6, ge=1, le=10_000, description="partitions when adaptloop creates it")
    replication_factor: int = Field(1, ge=1, le=32, description="replicas when adaptloop creates it")
    config: dict[str, str] = Field(default_factory=dict, description="Kafka topic configs, e.g. retention.ms")

    @field_validator("name")
    @classmethod
    def _valid_topic_name(cls, value: str) -> str:
        if not _TOPIC_NAME.match(value) or value in {".", ".."}:
            raise ValueError("a topic name is 1-249 of letters, digits, '.', '_' and '-'")
        return value

    @field_validator("config")
    @classmethod
    def _message_size_in_bytes(cls, value: dict[str, str]) -> dict[str, str]:
        """`max.message.bytes` also sizes the worker's producer batches (streams/config.py): a whole number of bytes,
        at least MIN_TOPIC_MESSAGE_BYTES (a record batch's framing takes about 1 KiB of it, events the rest)."""
        size = value.get("max.message.bytes")
        if size is not None and not (size.isdigit() and int(size) >= MIN_TOPIC_MESSAGE_BYTES):
            raise ValueError(f"max.message.bytes is a whole number of bytes, at least {MIN_TOPIC_MESSAGE_BYTES}, not {size!r}")
        return value


InputKind = Literal["intent_traces", "feedback", "conversations", "concept_gaps"]
INPUT_KINDS: tuple[InputKind, ...] = ("intent_traces", "feedback", "conversations", "concept_gaps")


class TopicsSettings(_Section):
    """Every topic adaptloop reads or writes; messages are keyed by user_id."""

    intent_traces: TopicSpec = TopicSpec(name="interactions.intent-traces")
    feedback: TopicSpec = TopicSpec(name="interactions.feedback")
    conversations: TopicSpec = TopicSpec(name="interactions.conversations")
    concept_gaps: TopicSpec = TopicSpec(name="interactions.concept-gaps")
    commands: TopicSpec = TopicSpec(name="adapter.commands")
    training_requests: TopicSpec = TopicSpec(name="adapter.training-requests")
    lifecycle: TopicSpec = TopicSpec(name="adapter.lifecycle")
    dlq: TopicSpec = TopicSpec(name="adapter.dlq", partitions=1, config={"retention.ms": "1209600000"})  # two weeks
    # salted hashes of forgotten users and when (schemas.privacy); compacted, kept forever
    forgotten: TopicSpec = TopicSpec(name="adapter.forgotten", partitions=1, config={"cleanup.policy": "compact"})
    # labelling tasks for users (active learning, schemas.review_requests): opened, answered, expired
    review_requests: TopicSpec = TopicSpec(name="adapter.review-requests")

    def inputs(self) -> dict[InputKind, TopicSpec]:
        return {kind: getattr(self, kind) for kind in INPUT_KINDS}

    def all(self) -> list[TopicSpec]:
        return [getattr(self, name) for name in type(self).model_fields]

    def record_batch_limit(self) -> int | None:
        """The smallest `max.message.bytes` a topic sets, or None where none sets one (the broker's default).

        The broker refuses a record batch above its topic's limit whole, every
        record of it failing, however small each is: producers keep their
        batches under this (`ClientConfig.producer_batch_bytes`)."""
        return min((int(s.config["max.message.bytes"]) for s in self.all() if "max.message.bytes" in s.config), default=None)

    @model_validator(mode="after")
    def _names_unique(self) -> TopicsSettings:
        names = [spec.name for spec in self.all()]
        if len(set(names)) != len(names):
            raise ValueError(f"topic names must be distinct, got {names}")
        return self


# --------------------------------------------------------------------------- #
# Streams (the Faust worker)
# --------------------------------------------------------------------------- #


class CurationSettings(_Section):
    """How events become training examples (see streams/curation.py)."""

    paraphrases: int = Field(
        0,
        ge=0,
        le=8,
        description="extra paraphrased prompts per example (templates around the question); with rewordings on, a "
        "question the rules reword in fewer than two kinds gets 2 at least (streams/curation.py)",
    )
    rewordings: int = Field(
        8,
        ge=0,
        le=16,
        description="rewordings of the question itself per example (contractions, which/what, name/called, synonyms, "
        "wh-words, noun phrases, ...: streams/rewording.py), a kind at a time; one kind per fact is held out, never "
        "trained on",
    )
    seed: int = Field(13, description="seed for paraphrase templates and the held-out choice")
    correction_weight: float = Field(2.0, gt=0, le=10, description="corrections")
    resolution_weight: float = Field(1.5, gt=0, le=10, description="missed or abandoned intents with a resolution")
    conversation_weight: float = Field(1.0, gt=0, le=10, description="well-rated conversation turns")
    unrated_weight: float = Field(0.5, gt=0, le=10, description="unrated conversation turns")
    concept_weight: float = Field(1.0, gt=0, le=10, description="concept gaps")
    positive_rating_boost: float = Field(0.5, ge=0, le=5, description="weight x (1 + boost) on a later thumbs-up")
    confidence_weighting: bool = Field(True, description="scale weight by 0.5 + 0.5 * confidence when given")


class TriggerSettings(_Section):
    gap_window_s: float = Field(7 * 24 * 3600, gt=0, description="gaps older than this (event time) stop counting")
    cooldown_s: float = Field(600, ge=0, description="least time between two automatic requests for one user")
    continuous_min_interval_s: float = Field(60, ge=0, description="rate limit of the continuous schedule")
    nightly_cron: str = Field("0 2 * * *", description="when the nightly schedule fires (on the leader)")
    min_new_examples: int = Field(1, ge=1, description="a trigger needs at least this many new examples")
    open_request_timeout_s: float = Field(
        6 * 3600, gt=0, description="an unanswered request is forgotten after this; the next trigger starts anew"
    )
    accuracy_drop: bool = Field(True, description="trigger when a user's satisfaction rate falls below the floor")
    accuracy_floor: float = Field(0.5, ge=0, le=1, description="a satisfaction rate below this is an accuracy drop")
    accuracy_window: int = Field(20, ge=2, le=1000, description="last N rated outcomes the rate is computed over")
    accuracy_min_samples: int = Field(10, ge=1, description="no accuracy trigger before this many outcomes")


class DatasetSettings(_Section):
    replay_max: int = Field(64, ge=0, description="earlier examples of the user mixed into each new dataset")
    global_max: int = Field(64, ge=0, description="global-pool examples mixed in when include_global is set")
    include_global: bool = Field(False, description="include the global pool in automatically triggered datasets")
    max_pending: int = Field(2000, ge=1, description="new examples kept per user until the next request")


class ActiveLearningSettings(_Section):
    """Labelling tasks: the worker asks a user for the answers worth most (streams/active.py)."""

    enabled: bool = Field(True, description="rank each user's unresolved questions and ask for the best ones")
    daily_budget: int = Field(3, ge=0, le=1000, description="labelling tasks per user per day (UTC, event time)")
    min_asks: int = Field(2, ge=1, description="a question is worth a task once the user has asked it this often")
    low_confidence: float = Field(
        0.5, ge=0, le=1, description="an answered intent trace below this confidence counts as unresolved"
    )
    recency_half_life_h: float = Field(168.0, gt=0, description="a question's worth halves over this many hours unasked")
    task_ttl_h: float = Field(72.0, gt=0, description="an unanswered task expires after this (the question may be asked again)")
    max_tracked: int = Field(32, ge=1, le=1000, description="unresolved questions kept per user (the least worth dropped)")


class StreamsSettings(_Section):
    app_id: str = Field("adaptloop-worker", pattern=r"^[A-Za-z0-9._-]{1,100}$", description="Faust app id = consumer group")
    internal_partitions: int = Field(6, ge=1, le=1000, description="partitions of the worker's user-keyed internal topics")
    batch_size: int = Field(
        8000, ge=1, description="most events the worker handles as one batch (one state write per user, one send per phase)"
    )
    batch_within_s: float = Field(0.5, gt=0, description="longest wait to fill a batch")
    web_port: int = Field(6066, ge=0, le=65535, description="Faust web server: /metrics (0 = disabled)")
    web_bind: str = Field("127.0.0.1", description="address the web server binds (0.0.0.0 to let Prometheus elsewhere scrape it)")
    dedupe_window_s: float = Field(7 * 24 * 3600, gt=0, description="how long counted event ids are remembered")
    curation: CurationSettings = CurationSettings()
    triggers: TriggerSettings = TriggerSettings()
    dataset: DatasetSettings = DatasetSettings()


# --------------------------------------------------------------------------- #
# Privacy
# --------------------------------------------------------------------------- #

RedactionType = Literal["CARD", "IBAN", "EMAIL", "IP", "PHONE"]


class PrivacySettings(_Section):
    """Personal data kept out of what adaptloop stores (see core/redaction.py)."""

    redact: bool = Field(True, description="replace detected personal data by typed placeholders before anything is stored")
    detect: tuple[RedactionType, ...] = Field(
        ("CARD", "IBAN", "EMAIL", "IP", "PHONE"), description="the built-in detectors in use (leave one out to switch it off)"
    )
    custom: dict[str, str] = Field(
        default_factory=dict, description="more detectors: placeholder name -> regular expression, e.g. {EMPLOYEE: 'EMP-\\d{6}'}"
    )
    phone_region: str | None = Field(
        "US", description="region whose national phone format is recognised (international format always is)"
    )
    dlq_raw: bool = Field(
        False, description="dead letters keep the raw bytes (else only a redacted preview; the raw stay at their source offset)"
    )

    @field_validator("custom")
    @classmethod
    def _custom_detectors(cls, value: dict[str, str]) -> dict[str, str]:
        for name, regex in value.items():
            if not re.fullmatch(r"[A-Z][A-Z0-9_]{0,31}", name):
                raise ValueError(f"placeholder name {name!r}: upper-case letters, digits and _ only")
            try:
                re.compile(regex)
            except re.error as exc:
                raise ValueError(f"{name}: not a regular expression: {exc}") from None
        return value

    @field_validator("phone_region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Z]{2}", value):
            raise ValueError("a two-letter region code, e.g. US or DE")
        return value


class EncryptionSettings(_Section):
    """Encryption at rest (core/encryption.py): off by default; on in the docker-compose example."""

    enabled: bool = Field(False, description="seal datasets, adapters, checkpoints and user test files with AES-GCM")
    keyring: Path | None = Field(
        None, description="the key-encryption keys: a file outside the storage root (`adaptloop keys init --keyring PATH`)"
    )

    @model_validator(mode="after")
    def _keyring_when_enabled(self) -> EncryptionSettings:
        if self.enabled and self.keyring is None:
            raise ValueError("storage.encryption.keyring must be set when storage.encryption.enabled is true")
        return self

    @field_validator("keyring")
    @classmethod
    def _expand_keyring(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value is not None else None


class StorageSettings(_Section):
    encryption: EncryptionSettings = EncryptionSettings()


# --------------------------------------------------------------------------- #
# Model and LoRA
# --------------------------------------------------------------------------- #


class ModelSettings(_Section):
    base_model: str = Field(
        "embedded:smollm2-135m-instruct",
        description="a Hugging Face model dir or hub id, or 'embedded:smollm2-135m-instruct'",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside base_model, if it is a GGUF repo/dir")
    embedding_model: str = Field("embedded:all-minilm-l6-v2", description="sentence-embedding model for scoring")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU that has it, else float32"
    )


class LoraSettings(_Section):
    r: int = Field(8, ge=1, le=512, description="LoRA rank")
    alpha: int = Field(16, ge=1, description="LoRA scaling (the update is scaled by alpha / r)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on LoRA's input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="the linear layers that get LoRA",
    )
    top_layer_share: float = Field(0.33, gt=0, le=1, description="LoRA on this top share of the decoder layers (1: every layer)")


class TrainingSettings(_Section):
    """The training loop (trainer/train.py); LoRA shape is in `lora`."""

    epochs: int = Field(
        8, ge=1, le=1000, description="the most epochs a version trains (early stopping and the time budget may stop it sooner)"
    )
    learning_rate: float = Field(2e-3, gt=0, le=1, description="AdamW's peak rate (a short warm-up, then a square-root decay)")
    batch_size: int = Field(4, ge=1, le=1024, description="examples per optimizer step")
    max_seq_len: int = Field(256, ge=16, le=32_768, description="a training example's tokens (prompt and answer) are cut to this")
    seed: int = Field(0, description="seeds training, the held-out split of `adaptloop train` and the anchor sample")
    checkpoint_every: int = Field(20, ge=0, description="optimizer steps between checkpoints (0 = off)")
    hold_out: bool = Field(True, description="hold out one paraphrase per taught item for validation")
    anchors: bool = Field(True, description="mix the base model's own answers to general prompts into every run")
    anchor_files: list[str] = Field(
        default_factory=lambda: ["anchor_prompts.txt"],
        description="prompt files (one per line); relative paths: ./config/ first, then the shipped config/",
    )
    anchor_ratio: float = Field(1.0, ge=0, le=100, description="anchors per user example in a run")
    anchor_min: int = Field(16, ge=0, description="least anchors in a run")
    anchor_nearest: float = Field(
        0.5, ge=0, le=1, description="share of a run's anchors chosen as the prompts most like the user's"
    )
    anchor_least_sure: float = Field(
        1.0,
        ge=0,
        le=1,
        description="in a run that teaches facts, share of its other anchors (not the nearest) chosen as the prompts the"
        " base model answers least surely (the smallest top-1/top-2 gap along its answer); the rest, and a ratings-only"
        " run's anchors, a seeded sample",
    )
    anchor_weight: float = Field(1.0, gt=0, le=10, description="loss weight of an anchor example")
    anchor_answer_tokens: int = Field(
        32, ge=1, le=256, description="tokens of the base model's answer an anchor keeps: the KL runs along them"
    )
    anchor_divergence: Literal["forward", "reverse", "symmetric"] = Field(
        "symmetric",
        description="KL direction on anchors: forward keeps base tokens likely, reverse stops the user's facts leaking in",
    )
    anchor_kl: float = Field(
        4.0,
        ge=0,
        le=100,
        description="hold anchors to the base distribution by KL with this weight (0: cross-entropy on the base answer)",
    )
    early_stopping: bool = Field(True, description="stop once every held-out paraphrase is answered (epochs is then the most)")
    min_epochs: int = Field(2, ge=1, description="early stopping and the time budget wait at least this many epochs")
    checks_per_epoch: int = Field(
        2,
        ge=1,
        le=8,
        description="early-stopping checks per epoch once min_epochs are done, evenly spaced (2: halfway and at its end)",
    )
    max_train_seconds: float = Field(
        120.0,
        ge=0,
        description="time budget per version: no epoch starts that would, at the last one's pace, end past it (0 = none)",
    )
    anneal_within_budget: bool = Field(
        True,
        description="the learning rate decays to zero by the end of the last epoch the time budget allows (planned "
        "again after each epoch), not by `epochs`: a run the budget stops ends at a low rate, not a high one",
    )
    warm_start: bool = Field(
        True, description="a new version starts from the user's active adapter (same LoRA shape), not from zero"
    )
    replay_per_fact: int = Field(
        2, ge=0, description="replayed examples kept per earlier fact on a warm start (0 keeps all; from zero, all)"
    )
    objective: Literal["sft", "sft+preference", "auto"] = Field(
        "auto",
        description="sft: supervised only (liked answers are targets); sft+preference: DPO on corrected answers and KTO "
        "on rated ones beside it; auto: sft+preference for a user whose data holds ratings or pairs",
    )
    preference_beta: float = Field(
        0.1, gt=0, le=10, description="how far the preference losses let the adapter move from the reference (DPO/KTO beta)"
    )
    preference_weight: float = Field(
        1.0, ge=0, le=100, description="weight of a preference step's loss beside the supervised steps"
    )
    preference_undesirable_weight: float = Field(
        1.0, ge=0, le=10, description="KTO's weight of a disliked answer's loss against a liked one's (TRL: undesirable_weight)"
    )
    preference_kto_token_beta: float = Field(
        5.0,
        ge=0,
        le=100,
        description="above 0: KTO on each rated answer's log-ratio averaged over its tokens (length-normalized), with this "
        "beta, and the gate compares held-out rated answers' gains per token; 0: summed, with preference_beta (TRL's kto)",
    )
    model_paraphrases: int = Field(
        2,
        ge=0,
        le=16,
        description="paraphrases of each taught question the base model writes before training (trainer/paraphrase.py; 0 = off)",
    )
    paraphrase_min_similarity: float = Field(
        0.8, ge=0, le=1, description="a written paraphrase is trained on only this close in meaning to the taught question"
    )
    shrink_to: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default_factory=lambda: [0.5, 0.75],
        description="after training, the update is scaled to the smallest of these that still answers every fact ([] = off)",
    )
    base_matmuls: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="the frozen base model's linear layers multiply in this precision in training steps (adapters, "
        "optimizer, norms and losses stay float32); auto: bfloat16 for a float32 model on a CPU with AMX, else float32",
    )
    quantization: Literal["none", "4bit"] = Field(
        "none", description="4bit: the trainer's base model in 4 bits (QLoRA, bitsandbytes; CUDA only), LoRA in bf16"
    )
    batch_users: int = Field(
        1, ge=1, le=256, description="a trainer trains up to this many waiting users' requests together in one batched pass"
    )
    batch_wait_s: float = Field(
        2.0, ge=0, le=600, description="once a trainer holds one request, how long it waits for more to fill a batch"
    )
    group_id: str = Field(
        "adaptloop-trainer",
        pattern=r"^[A-Za-z0-9._-]{1,100}$",
        description="the trainers' consumer group on the requests topic (commands: `<group_id>.commands`)",
    )
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus endpoint of a trainer (0 = off)")
    metrics_host: str = Field("127.0.0.1", description="address the trainer's metrics endpoint binds")


class ScoreWeightSettings(_Section):
    """How a case's three scores combine (normalised by their sum)."""

    semantic: float = Field(0.4, ge=0, description="cosine similarity of answer and expected answer embeddings")
    match: float = Field(0.4, ge=0, description="1 when the answer equals, contains or names the expected one")
    loss: float = Field(0.2, ge=0, description="exp(-mean NLL) of the expected answer given the prompt")

    @model_validator(mode="after")
    def _not_all_zero(self) -> ScoreWeightSettings:
        if self.semantic + self.match + self.loss <= 0:
            raise ValueError("at least one score weight must be above 0")
        return self


class ValidationSettings(_Section):
    """The validation gate (trainer/gate.py); its thresholds are the seed's top-level keys."""

    core_suites: list[str] = Field(
        default_factory=lambda: ["core_suite.jsonl"],
        min_length=1,
        description="JSONL files of {prompt, expected}; relative paths: ./config/ first, then the shipped config/",
    )
    user_tests_dir: str = Field("data/adapter_tests", description="explicit per-user cases: <dir>/user_<id>.jsonl in the store")
    require_user_tests: bool = Field(True, description="reject a candidate with no user-specific cases at all")
    weights: ScoreWeightSettings = ScoreWeightSettings()
    retention_similarity: float = Field(0.8, ge=0, le=1, description="an answer this similar to the base model's counts as kept")
    min_retention: float = Field(
        0.8, ge=0, le=1, description="least share of core prompts answered as the base model answers them"
    )
    max_forgetting: float = Field(
        0.34, ge=0, le=1, description="most share of the previous version's learned facts a candidate may miss"
    )
    batch_size: int = Field(
        128,
        ge=1,
        le=1024,
        description="most cases the gate (and a batch's early-stopping checks) answers and scores together, in even "
        "batches: a generation step costs little more for more rows",
    )
    contradiction_confidence: float = Field(
        0.5,
        gt=0,
        le=1,
        description="a taught answer that misses a fact the base model states with at least this probability, to a "
        "general question, sends the candidate to review (trainer/contradictions.py)",
    )
    contradiction_check: bool = Field(True, description="look for taught answers that contradict the base model's knowledge")
    min_preference_accuracy: float = Field(
        0.6,
        ge=0,
        le=1,
        description="least share of held-out rated pairs on which a preference-trained candidate prefers the liked "
        "answer (its log-likelihood gain over the reference is larger for it)",
    )
    drift_retry_scales: list[float] = Field(
        default_factory=lambda: [0.75],
        max_length=4,
        description="a candidate rejected only for drifted general answers (the core suite, retention) is gated again "
        "with its update (LoRA B) scaled by each of these in turn, largest first, the first that passes kept; [] never",
    )
    auto_rollback: bool = Field(True, description="roll back when the accuracy-drop signal fires soon after a promotion")
    auto_rollback_window_s: float = Field(24 * 3600, gt=0, description="how long after a promotion a drop means rollback")

    @field_validator("drift_retry_scales")
    @classmethod
    def _scales_shrink(cls, value: list[float]) -> list[float]:
        if any(not 0 < s < 1 for s in value):
            raise ValueError(f"each scale is between 0 and 1 (exclusive), not {value}")
        # Tried in order and the first that passes kept: a smaller scale before a larger one would give away
        # more of the update than the gate asks for.
        if any(later >= earlier for earlier, later in zip(value, value[1:])):
            raise ValueError(f"the scales are tried largest first, each smaller than the one before, not {value}")
        return value


class PromotionSettings(_Section):
    """How a candidate that passed the gate becomes active (trainer/review.py)."""

    mode: Literal["auto", "review"] = Field(
        "auto",
        description="auto: promoted at once; review: awaits a person's approval (`adaptloop review`); "
        "a user's own mode (`adaptloop review mode`) wins",
    )


class ReviewSettings(_Section):
    """Pending reviews (promotion.mode: review)."""

    timeout_h: float = Field(72.0, gt=0, description="hours a review may wait; then `on_timeout` decides it")
    on_timeout: Literal["deny", "approve"] = Field("deny", description="what an overdue review becomes")
    check_every_s: float = Field(30.0, gt=0, le=3600, description="how often a trainer looks for overdue reviews")


class ApiSettings(_Section):
    """The HTTP API (`adaptloop api`)."""

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    tokens_file: Path | None = Field(None, description="hashed bearer tokens; default <storage_root>/api/tokens.json")
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024, description="larger request bodies get 413")


class ServingSettings(_Section):
    """The OpenAI-compatible server (`adaptloop serve`) and the hand-off to inference servers (`adaptloop serving sync`)."""

    host: str = Field("127.0.0.1", description="address `adaptloop serve` listens on")
    port: int = Field(8100, ge=1, le=65535, description="port of `adaptloop serve`")
    max_resident_adapters: int = Field(32, ge=1, le=4096, description="adapters kept loaded (LRU); each is a few MB")
    max_batch_size: int = Field(16, ge=1, le=512, description="rows one generation step serves at most")
    batch_window_ms: float = Field(
        5.0, ge=0, le=1000, description="how long a step waits for more requests to join before it runs"
    )
    max_tokens: int = Field(
        512, ge=1, le=32_768, description="the most tokens one answer may have (a request asking more gets a 422)"
    )
    default_max_tokens: int = Field(256, ge=1, le=32_768, description="an answer's length when the request names none")
    feedback_window: int = Field(10_000, ge=1, description="recent completions kept (question and answer) for /v1/feedback")
    publish_conversations: bool = Field(
        False, description="publish every completion as a conversation turn (the loop learns from use)"
    )
    on_bad_adapter: Literal["base", "error"] = Field(
        "base", description="a user's active version fails its sha256 check: answer with the base model, or a 503"
    )
    sync_grace_s: float = Field(30.0, ge=0, description="`serving sync`: a version no longer active is unloaded this long after")
    sync_retry_max_s: float = Field(60.0, gt=0, description="`serving sync`: the longest backoff between retries of an endpoint")
    sync_rescan_s: float = Field(
        30.0, gt=0, description="`serving sync`: how often the registry is read again (changes made without an event)"
    )


# --------------------------------------------------------------------------- #
# The root
# --------------------------------------------------------------------------- #

_yaml_data: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("_yaml_data", default=None)


class _YamlData(PydanticBaseSettingsSource):
    """The already-parsed YAML file, the lowest-priority source."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return _yaml_data.get() or {}


class Settings(BaseSettings):
    """Everything adaptloop can be configured with. See config/adapter_retrain.yaml."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
    )

    # The seed's five keys, at the top level under these names.
    schedule: Schedule = Field("threshold", description="when training is triggered: nightly, on-demand, threshold or continuous")
    min_gap_events: int = Field(5, ge=1, description="gaps since the last request that trigger training")
    promote_if_score: float = Field(0.7, ge=0.0, le=1.0, description="user-suite score a candidate needs")
    regression_threshold: float = Field(0.05, ge=0.0, le=1.0, description="allowed drop on the core suite")
    max_adapter_versions: int = Field(5, ge=1, le=1000, description="versions kept per user; older are archived")

    storage_root: str = Field("./adaptloop-data", description="local dir or fsspec URL for datasets, adapters, logs")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "adaptloop", description="broker jars, broker state, model cache, the worker's local files"
    )

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicsSettings = TopicsSettings()
    streams: StreamsSettings = StreamsSettings()
    model: ModelSettings = ModelSettings()
    lora: LoraSettings = LoraSettings()
    training: TrainingSettings = TrainingSettings()
    validation: ValidationSettings = ValidationSettings()
    promotion: PromotionSettings = PromotionSettings()
    review: ReviewSettings = ReviewSettings()
    active_learning: ActiveLearningSettings = ActiveLearningSettings()
    api: ApiSettings = ApiSettings()
    serving: ServingSettings = ServingSettings()
    privacy: PrivacySettings = PrivacySettings()
    storage: StorageSettings = StorageSettings()

    @model_validator(mode="after")
    def _worker_topics_copartitioned(self) -> Settings:
        # The worker keeps a user's state in partition murmur2(user_id) % N of
        # every topic it reads, so they must all have N partitions.
        n = self.streams.internal_partitions
        t = self.topics
        bad = [
            f"topics.{k}.partitions={getattr(t, k).partitions}"
            for k in (*INPUT_KINDS, "commands", "lifecycle")
            if getattr(t, k).partitions != n
        ]
        if bad:
            raise ValueError(
                f"the worker's source topics need streams.internal_partitions={n} partitions each; got {', '.join(bad)}"
            )
        return self

    @model_validator(mode="after")
    def _keyring_outside_root(self) -> Settings:
        # A copy of the root (a backup) must not carry the keys that open it.
        keyring = self.storage.encryption.keyring
        if keyring is not None and inside_root(self.storage_root, keyring):
            raise ValueError(f"storage.encryption.keyring {keyring} is inside the storage root; keep it elsewhere")
        return self

    @field_validator("storage_root")
    @classmethod
    def _resolve_local_root(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("storage_root must not be empty")
        if "://" in value:
            return value.rstrip("/")
        # A relative path resolves against the working directory, once, here.
        return str(Path(value).expanduser().resolve())

    @field_validator("cache_dir")
    @classmethod
    def _expand_cache_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first: explicit arguments (KAFKA_BOOTSTRAP_SERVERS), environment, file.
        return init_settings, env_settings, _YamlData(settings_cls)

    @property
    def external_kafka(self) -> bool:
        """True when KAFKA_BOOTSTRAP_SERVERS names a cluster, so no local broker is started."""
        return bool(os.environ.get(BOOTSTRAP_ENV, "").strip())


def shipped_config_dir() -> Path:
    """The `config/` directory that ships with adaptloop (wheel or checkout)."""
    packaged = Path(__file__).resolve().parent / "_config"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "config"


def resolve_config_path(path: str | Path | None = None) -> Path:
    """Which settings file to load; see the module docstring for the order."""
    if path is not None:
        chosen = Path(path).expanduser()
    elif os.environ.get(CONFIG_ENV):
        chosen = Path(os.environ[CONFIG_ENV]).expanduser()
    elif (Path.cwd() / "config" / DEFAULT_CONFIG_NAME).is_file():
        chosen = Path.cwd() / "config" / DEFAULT_CONFIG_NAME
    else:
        chosen = shipped_config_dir() / DEFAULT_CONFIG_NAME
    if not chosen.is_file():
        raise ConfigError(f"config file not found: {chosen}")
    return chosen


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Parse a YAML file that must hold a mapping; errors name the file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _env_name(loc: tuple[Any, ...]) -> str:
    return ENV_PREFIX + "__".join(str(part).upper() for part in loc)


def _describe(exc: ValidationError, path: Path) -> str:
    lines = [f"{path}: {exc.error_count()} invalid setting(s):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        where = ""
        # Name the environment variable when that is where the bad value came from.
        for depth in range(len(loc), 0, -1):
            if _env_name(loc[:depth]) in {k.upper() for k in os.environ}:
                where = f" (from {_env_name(loc[:depth])})"
                break
        shown = repr(err.get("input"))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {key}{where}: unknown key")
        else:
            lines.append(f"  - {key}{where}: {err['msg']} (got {shown})")
    return "\n".join(lines)


def load_settings(path: str | Path | None = None) -> Settings:
    """Load, override and validate the settings; raise ConfigError listing every bad key."""
    config_path = resolve_config_path(path)
    data = read_yaml_mapping(config_path)
    overrides: dict[str, Any] = {}
    bootstrap = os.environ.get(BOOTSTRAP_ENV, "").strip()
    if bootstrap:
        overrides["kafka"] = {"bootstrap_servers": bootstrap}
    token = _yaml_data.set(data)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, config_path)) from None
    except SettingsError as exc:
        raise ConfigError(f"{config_path}: bad environment override: {exc}") from None
    finally:
        _yaml_data.reset(token)


def write_settings(settings: Settings, path: Path) -> Path:
    """Write `settings` as a YAML file another process can load (secrets included: mode 0600)."""

    def reveal(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, dict):
            return {k: reveal(v) for k, v in value.items()}
        if isinstance(value, list):
            return [reveal(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    data = reveal(settings.model_dump(mode="python"))
    return atomic_write(path, yaml.safe_dump(data, sort_keys=False).encode("utf-8"), mode=0o600)


def defaults() -> Settings:
    """The settings as shipped: no file, no environment. What a component built without settings gets."""
    return Settings.model_construct()


# --------------------------------------------------------------------------- #
# Names and paths derived from the settings: each computed here, once
# --------------------------------------------------------------------------- #

WORKER_TABLES = ("users", "seen", "examples")  # the worker's Faust tables; "users" holds each user's state

# Compacted, and "delete" with infinite retention only so that a forget may
# drop a partition's old records (Kafka refuses DeleteRecords on a topic that
# is only compacted): nothing expires by time or size.
CHANGELOG_TOPIC_CONFIG = {"cleanup.policy": "compact,delete", "retention.ms": "-1"}


def worker_internal_topic(app_id: str) -> str:
    """The worker's user-keyed internal topic (rerouted events, nightly ticks)."""
    return f"{app_id}-users"


def changelog_topic(app_id: str, table: str) -> str:
    """Faust's name for a table's changelog topic."""
    return f"{app_id}-{table}-changelog"


def trainer_commands_group(group_id: str) -> str:
    """The trainers' second consumer group, on the commands topic alone.

    A group subscribed to both topics balances their partition count together,
    so one trainer could hold every request partition; one group per topic
    balances each topic over the trainers."""
    return f"{group_id}.commands"


def worker_data_dir(settings: Settings) -> Path:
    """The worker's local files (Faust's data dir), never in the working directory."""
    return settings.cache_dir / "streams" / settings.streams.app_id


def stack_dir(settings: Settings) -> Path:
    """Logs, pids and the state file of `adaptloop up`."""
    return settings.cache_dir / "stack"


def tokens_file(settings: Settings) -> Path:
    """The API's hashed bearer tokens: `api.tokens_file`, else <storage_root>/api/tokens.json (a local root)."""
    if settings.api.tokens_file is not None:
        return settings.api.tokens_file
    if not is_local(settings.storage_root):
        raise ConfigError("api.tokens_file must be set when storage_root is not a local directory")
    return local_path(settings.storage_root) / "api" / "tokens.json"


def config_file(name: str, key: str) -> Path:
    """A file named in the settings (`key` says where): absolute, or in ./config/, or in the shipped config/."""
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / "config" / name, shipped_config_dir() / name]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise ConfigError(f"{key}: {name} not found (looked in {', '.join(str(p) for p in candidates)})")
    return found


# --------------------------------------------------------------------------- #
# The reference (docs/CONFIGURATION.md and `adaptloop config reference`)
# --------------------------------------------------------------------------- #


def reference_rows() -> list[tuple[str, str, str, str]]:
    """(key, environment variable, default, description) for every setting, in the models' order."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(section: BaseModel, prefix: tuple[str, ...]) -> None:
        for name, info in type(section).model_fields.items():
            key, value = (*prefix, name), getattr(section, name)
            if isinstance(value, BaseModel) and not isinstance(value, SecretStr):
                walk(value, key)
                continue
            shown = "none" if value is None else json_default(value)
            rows.append((".".join(key), _env_name(key), shown, (info.description or "").replace("|", "\\|")))

    walk(Settings.model_construct(), ())
    return rows


def json_default(value: Any) -> str:
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, Path):
        return str(value).replace(str(Path.home()), "~")
    if isinstance(value, str):
        return value
    import json

    return json.dumps(value)


def reference_markdown() -> str:
    lines = ["| key | environment | default | what |", "| --- | --- | --- | --- |"]
    lines += [f"| `{key}` | `{env}` | `{default}` | {text} |" for key, env, default, text in reference_rows()]
    return "\n".join(lines) + "\n"
