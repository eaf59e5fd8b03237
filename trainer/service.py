"""`adaptloop trainer`: the training consumer, one process per GPU or CPU host.

    adaptloop trainer [--config PATH]

Two confluent-kafka consumer groups (cooperative-sticky assignment):
`training.group_id` on `adapter.training-requests` and `<group_id>.commands`
on `adapter.commands`, so that each topic's partitions are spread evenly over
the trainers (one group on both topics balances their sum: one trainer could
hold every request partition). A user's requests sit in one partition, so one
trainer handles them at a time.

Per request: train -> validation gate -> register -> promote or reject, with
lifecycle events `training_started`, `training_completed`, `validated`, then
`promoted` or `rejected` (in review mode `awaiting_review`, trainer/review.py).
Commands: `validate` runs the gate on a registered version (report only),
`rollback` swaps the active pointer back, `approve` and `deny` decide a
review (`approved` + `promoted`, or `denied`); `retrain` is the streams
worker's. Commands are idempotent by `command_id` (the validation, rollback
and reviews logs record it). Every `review.check_every_s` a trainer decides
the reviews pending longer than `review.timeout_h` as `review.on_timeout` says.

Batches: with `training.batch_users` K > 1, a trainer holding one request
keeps reading requests for up to `training.batch_wait_s` (until it holds K,
or a user comes twice: that request is read again after the batch) and trains
those users together in one batched pass (trainer/multi.py), then gates and
registers each. K = 1 (the default) trains each request as it comes.

Delivery:
- One job at a time (a batch is one job). Training runs in a worker thread
  while the main loop keeps polling both consumers with every assigned
  partition paused, so a long job never gets a consumer thrown out of its group.
- Offsets are committed only after the outcomes (a registered version, or a
  failure) are recorded and their lifecycle events acknowledged:
  at-least-once. While a batch is gathered or trained, the offsets of requests
  answered at once (skips, republished versions) wait for it, so no commit
  ever passes a request still in training.
- Idempotent by `request_id`: a redelivered request whose version exists
  republishes `training_completed` and trains nothing.
- Checkpoints every N steps under `models/adapters/checkpoints/<request_id>/`;
  a request redelivered after a crash resumes from its last checkpoint.
- SIGTERM/SIGINT: the running job checkpoints, nothing is committed, the
  consumer leaves the group cleanly; the request is picked up again later.
  A batch interrupted because one of its partitions moved away reads its
  other requests again from their offsets (each resumes from its checkpoint).
"""

from __future__ import annotations

import logging
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from core.encryption import open_store
from core.errors import (
    AdaptloopError,
    InvalidMessage,
    KafkaOperationError,
    ReviewError,
    RollbackError,
    StorageError,
    TrainingInterrupted,
    TrainingSkipped,
)
from core.forgotten import ForgetMarkers, UserHasher
from core.kafka.client import ClientConfig
from core.kafka.lag import ConsumerLagCollector
from core.redaction import Redactor
from core.settings import EncryptionSettings, Settings, trainer_commands_group
from core.storage import sha256_bytes
from schemas import (
    COMMAND_ADAPTER,
    ApproveCommand,
    Command,
    DeadLetter,
    DenyCommand,
    LifecycleEvent,
    Review,
    RollbackCommand,
    TrainingRequest,
    ValidateCommand,
    reason_text,
)
from schemas.dataset import from_jsonl
from schemas.decode import decode
from schemas.training import TrainingExample
from trainer import metrics
from trainer.checkpoint import resumable_checkpoint
from trainer.gate import GateReport
from trainer.job import (
    JobHooks,
    Outcome,
    TrainingJob,
    apply_decision,
    is_tick,
    progress_log,
    runner_from_settings,
    skip_reason,
    user_cases,
    validate_adapter,
)
from trainer.model import BaseModelRef, load_base, resolve_base_model
from trainer.registry import VersionInfo, version_label
from trainer.review import Decision, decide, settle_overdue
from trainer.train import StepReport, remove_checkpoint

log = logging.getLogger("adaptloop.trainer")

# A request or command names its data (a dataset's URI and sha256) and the lineage's offset ranges, never the data
# itself: one larger than this is malformed, dead-lettered as any other (a command by the streams worker).
MAX_REQUEST_BYTES = 1 << 20


@dataclass(frozen=True)
class TrainerConfig:
    """The service's own plain values; the training job itself is built from the settings (`runner_from_settings`)."""

    client: ClientConfig
    group_id: str  # on the requests topic; the commands topic's group is trainer_commands_group(group_id)
    requests_topic: str
    commands_topic: str
    lifecycle_topic: str
    dlq_topic: str
    storage_root: str
    user_tests_dir: str
    metrics_port: int  # 0: no metrics endpoint
    metrics_host: str
    session_timeout_s: float
    batch_users: int
    batch_wait_s: float
    redactor: Redactor  # dead letters' previews and reasons
    dlq_raw: bool
    encryption: EncryptionSettings  # storage.encryption: seal personal files
    review_timeout_h: float
    review_on_timeout: str
    review_check_s: float

    @classmethod
    def from_settings(cls, settings: Settings, metrics_port: int | None = None) -> TrainerConfig:
        t = settings.topics
        return cls(
            client=ClientConfig.from_settings(settings),
            group_id=settings.training.group_id,
            requests_topic=t.training_requests.name,
            commands_topic=t.commands.name,
            lifecycle_topic=t.lifecycle.name,
            dlq_topic=t.dlq.name,
            storage_root=settings.storage_root,
            encryption=settings.storage.encryption,
            user_tests_dir=settings.validation.user_tests_dir,
            metrics_port=settings.training.metrics_port if metrics_port is None else metrics_port,
            metrics_host=settings.training.metrics_host,
            session_timeout_s=settings.kafka.session_timeout_s,
            batch_users=settings.training.batch_users,
            batch_wait_s=settings.training.batch_wait_s,
            redactor=Redactor.from_settings(settings),
            dlq_raw=settings.privacy.dlq_raw,
            review_timeout_h=settings.review.timeout_h,
            review_on_timeout=settings.review.on_timeout,
            review_check_s=settings.review.check_every_s,
        )


Position = TopicPartition  # a message's topic, partition and the offset after it (what a commit of it says)


@dataclass
class _Job:
    """What the job thread works on: one validate command, or one or more users' training requests."""

    messages: list[tuple[TrainingRequest | ValidateCommand, Position]]
    thread: threading.Thread
    results: list[Outcome | GateReport | Exception | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.messages)

    def holds(self, partitions) -> bool:
        return any((p.topic, p.partition) == (m.topic, m.partition) for _, m in self.messages for p in partitions)


class TrainerService:
    def __init__(self, settings: Settings, cfg: TrainerConfig, base: BaseModelRef) -> None:
        self.cfg = cfg
        self.base = base
        self.model, self.tokenizer, self.device = load_base(base, settings.model.dtype, settings.training.quantization)  # once
        self.runner = runner_from_settings(settings, base, self.model, self.tokenizer, self.device)
        self.registry, self.gate = self.runner.registry, self.runner.gate
        self.store = open_store(cfg.storage_root, cfg.encryption)
        self.hasher, self.forgets = UserHasher.for_store(self.store), ForgetMarkers(self.store)
        self.stop = threading.Event()  # the process is stopping
        self.abort = threading.Event()  # the running job's partition was revoked
        self.job: _Job | None = None
        self.pending: list[tuple[TrainingRequest, Position]] = []  # a batch being gathered
        self.pending_since = 0.0
        self.deferred: list[Position] = []  # answered at once while a batch is gathered: committed after it
        self.reviews_due = 0.0  # when to look for overdue reviews next (time.monotonic)
        self.requests = self._consumer(cfg.group_id)
        self.commands = self._consumer(trainer_commands_group(cfg.group_id))
        self.producer = Producer(cfg.client.librdkafka_producer(**{"enable.idempotence": True, "partitioner": "murmur2_random"}))

    def _consumer(self, group_id: str) -> Consumer:
        return Consumer(
            self.cfg.client.librdkafka(
                **{
                    "group.id": group_id,
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "partition.assignment.strategy": "cooperative-sticky",
                    "max.poll.interval.ms": 300_000,
                    "session.timeout.ms": int(self.cfg.session_timeout_s * 1000),
                    "heartbeat.interval.ms": int(min(3.0, self.cfg.session_timeout_s / 3) * 1000),
                }
            )
        )

    def _consumer_of(self, topic: str) -> Consumer:
        return self.commands if topic == self.cfg.commands_topic else self.requests

    def _pause_all(self) -> None:
        for consumer in (self.requests, self.commands):
            consumer.pause(consumer.assignment())

    def _resume_all(self) -> None:
        for consumer in (self.requests, self.commands):
            consumer.resume(consumer.assignment())

    # ---- lifecycle events -------------------------------------------------- #

    def _emit(self, kind: str, about: TrainingRequest | Command | Review, wait: bool = True, **fields) -> None:
        """Publish one lifecycle event and wait for its acknowledgement (`wait=False`: progress, sent in the background).

        A review's events carry the command that decided it as `job_id` (none for a timeout or a supersede)."""
        if isinstance(about, TrainingRequest):
            ids = {"request_id": about.request_id, "job_id": about.command_id}
            prefix = about.request_id
        elif isinstance(about, Review):
            ids, prefix = {"job_id": about.command_id}, about.command_id or about.review_id
        else:
            ids, prefix = {"job_id": about.command_id}, about.command_id
        event = LifecycleEvent(
            event_id=f"{prefix}-{kind}-{uuid.uuid4().hex[:6]}"[-128:], type=kind, user_id=about.user_id, **ids, **fields
        )
        self.producer.produce(self.cfg.lifecycle_topic, key=about.user_id, value=event.to_bytes())
        if not wait:
            self.producer.poll(0)
        elif self.producer.flush(30):
            raise KafkaOperationError(f"lifecycle event {kind} for {prefix} not acknowledged")
        metrics.LIFECYCLE.labels(kind).inc()

    def _progress(self, request: TrainingRequest) -> Callable[[StepReport], None]:
        """Every tenth of the steps: a log line and a `training_progress` event (what `adaptloop status` shows)."""
        log_line = progress_log(request.user_id)

        def update(report: StepReport) -> None:
            log_line(report)
            if is_tick(report):
                details = {"phase": "training", "step": report.step, "total": report.total, "loss": report.loss}
                self._emit("training_progress", request, wait=False, details=details)

        return update

    def _announce(self, request: TrainingRequest, info: VersionInfo, decision: str, republished: bool = False) -> None:
        """training_completed, then the gate's verdict: validated + promoted | rejected."""
        manifest = info.manifest
        metrics_of = manifest.metrics.numbers()
        details = {"republished": republished, "adapter": str(info.path)}
        if not republished:
            metrics.TRAIN_SECONDS.observe(metrics_of.get("train_seconds", 0.0))
            metrics.TOKENS.inc(metrics_of.get("tokens", 0))
        self._emit("training_completed", request, version=info.version, metrics=metrics_of, details=details)
        validation = manifest.validation
        if validation is None:
            return
        suites = {name: suite.model_dump() for name, suite in validation.suites.items()}
        details = {**details, "passed": validation.passed, "suites": suites}
        if validation.contradictions:
            details["contradictions"] = [c.model_dump() for c in validation.contradictions]
        self._emit("validated", request, version=info.version, metrics=metrics_of, details=details)
        reviews = self.registry.reviews(info.user_id)
        for review in reviews:
            if review.superseded_by == info.version:  # this version replaced an older one awaiting review
                self._announce_review(Decision(review))
        missed = manifest.missed_cases()
        if missed:
            details["missed_cases"] = missed  # the worker may ask the user about them
        if decision == "awaiting_review":
            review_id = next(r.review_id for r in reviews if r.version == info.version)
            self._emit(
                "awaiting_review", request, version=info.version, metrics=metrics_of, details=details | {"review_id": review_id}
            )
        elif decision == "promoted":
            self._emit(
                "promoted",
                request,
                version=info.version,
                previous_version=validation.reference_version,
                metrics=metrics_of,
                details=details,
            )
        else:
            self._emit(
                "rejected",
                request,
                version=info.version,
                metrics=metrics_of,
                details=details,
                reason=reason_text("; ".join(validation.reasons)),
            )

    def _announce_review(self, decision: Decision, republished: bool = False) -> None:
        """A decided review: `approved` then `promoted` (what servers follow), or `denied`."""
        review = decision.review
        details = {"review_id": review.review_id, "decided_by": review.decided_by, "republished": republished}
        if review.status == "approved":
            missed = self.registry.info(review.user_id, review.version).manifest.missed_cases()
            self._emit("approved", review, version=review.version, previous_version=decision.previous, details=details)
            promoted = details | ({"missed_cases": missed} if missed else {})
            self._emit("promoted", review, version=review.version, previous_version=decision.previous, details=promoted)
            return
        if review.superseded_by is not None:
            details["superseded_by"] = review.superseded_by
        self._emit("denied", review, version=review.version, reason=reason_text(review.reason or "denied"), details=details)

    # ---- the loop ------------------------------------------------------------ #

    def run(self) -> None:
        def on_assign(consumer, partitions):
            if self.job is not None:
                consumer.pause(partitions)  # one job at a time

        def on_revoke(consumer, partitions):
            job = self.job
            if job is not None and job.holds(partitions):
                log.warning("partition of the running job was revoked; checkpointing and handing it over")
                self.abort.set()
            # Whoever gets these partitions reads their uncommitted requests: not ours to train or commit.
            gone = {(p.topic, p.partition) for p in partitions}
            self.pending = [(r, m) for r, m in self.pending if (m.topic, m.partition) not in gone]
            self.deferred = [m for m in self.deferred if (m.topic, m.partition) not in gone]

        self.requests.subscribe([self.cfg.requests_topic], on_assign=on_assign, on_revoke=on_revoke)
        self.commands.subscribe([self.cfg.commands_topic], on_assign=on_assign, on_revoke=on_revoke)
        log.info(
            "trainer ready: group %s, topic %s, base model %s", self.cfg.group_id, self.cfg.requests_topic, self.base.model_id
        )
        try:
            while True:
                if self.job is not None and not self.job.thread.is_alive():
                    self._finish_job()
                if self.stop.is_set() and self.job is None:
                    break  # a batch being gathered is left uncommitted: read again later
                if time.monotonic() >= self.reviews_due:
                    self._settle_reviews()
                if self.job is None and self._batch_ready():
                    self._start_batch()
                if self.job is None and not self.pending and self.deferred:  # the batch they waited for went elsewhere
                    self._commit(self.deferred, [])
                    self.deferred = []
                for consumer in (self.commands, self.requests):  # both polled every turn: their groups' deadlines
                    msg = consumer.poll(0.25)
                    if msg is None or self.stop.is_set():
                        continue
                    if msg.error():
                        if msg.error().code() != KafkaError._PARTITION_EOF:
                            log.error("consumer error: %s", msg.error())
                        continue
                    self._handle(msg)
        finally:
            for consumer in (self.requests, self.commands):
                consumer.close()  # leaves the group cleanly
            self.producer.flush(30)

    def _handle(self, msg) -> None:
        next_offset = TopicPartition(msg.topic(), msg.partition(), msg.offset() + 1)
        is_command = msg.topic() == self.cfg.commands_topic
        try:
            message = decode(COMMAND_ADAPTER if is_command else TrainingRequest, msg.value(), MAX_REQUEST_BYTES)
        except InvalidMessage as exc:
            if not is_command:  # the streams worker dead-letters bad commands; one letter per message is enough
                letter = DeadLetter.of(
                    topic=msg.topic(),
                    partition=msg.partition(),
                    offset=msg.offset(),
                    key=msg.key(),
                    value=msg.value(),
                    reason=exc.reason,
                    redactor=self.cfg.redactor,
                    keep_raw=self.cfg.dlq_raw,
                )
                self.producer.produce(self.cfg.dlq_topic, key=msg.key(), value=letter.to_bytes())
                self.producer.flush(30)
            self._done(next_offset)
            return
        if isinstance(message, RollbackCommand):
            self._rollback(message)
        elif isinstance(message, (ApproveCommand, DenyCommand)):
            self._review(message)
        elif isinstance(message, ValidateCommand):
            if not self._republish_validation(message):
                self._start([(message, next_offset)], self._validate)
                return
        elif isinstance(message, TrainingRequest) and not self._request(message, next_offset):
            return  # gathered into a batch: its offset is committed when the batch ends
        self._done(next_offset)

    def _done(self, position: Position) -> None:
        """Commit a message answered at once; a request's waits while a batch is gathered (a commit passes earlier offsets)."""
        if position.topic == self.cfg.requests_topic and self.pending:
            self.deferred.append(position)
        else:
            self._consumer_of(position.topic).commit(offsets=[position], asynchronous=False)

    # ---- batches ------------------------------------------------------------------- #

    def _gather(self, request: TrainingRequest, next_offset: Position) -> None:
        """Add a request to the batch being gathered; a user already in it closes the batch, and this request is read again."""
        if any(r.user_id == request.user_id for r, _ in self.pending):
            self._consumer_of(next_offset.topic).seek(
                TopicPartition(next_offset.topic, next_offset.partition, next_offset.offset - 1)
            )
            self._start_batch()
            return
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append((request, next_offset))
        if len(self.pending) >= self.cfg.batch_users:
            self._start_batch()

    def _batch_ready(self) -> bool:
        """A batch is gathered: full, or the first request has waited `batch_wait_s` (never while stopping)."""
        if not self.pending or self.stop.is_set():
            return False
        return len(self.pending) >= self.cfg.batch_users or time.monotonic() - self.pending_since >= self.cfg.batch_wait_s

    def _start_batch(self) -> None:
        if self.job is not None:
            return  # a validate command runs: the batch starts after it
        batch, self.pending = self.pending, []
        for request, _ in batch:
            self._emit("training_started", request)
        if len(batch) > 1:
            log.info("training %d users together: %s", len(batch), ", ".join(r.user_id for r, _ in batch))
        self._start(list(batch), self._train)

    def _request(self, request: TrainingRequest, next_offset: TopicPartition) -> bool:
        """Gather the request into a batch (False), or answer it at once (True: commit): a version it already produced, or a skip."""
        done = self.registry.find_by_request(request.user_id, request.request_id)
        if done is not None:
            log.info("request %s already produced %s v%d; republishing", request.request_id, request.user_id, done.version)
            remove_checkpoint(self._checkpoint_dir(request))  # left behind when a kill came right after registering
            decision = apply_decision(self.registry, done, job_id=request.command_id, mode=self.runner.mode_of(request.user_id))
            self._announce(request, done, decision, republished=True)
            return True
        reason = self._forgotten(request) or self._skip_reason(request)
        if reason is not None:
            remove_checkpoint(self._checkpoint_dir(request))
            log.info("request %s for %s skipped: %s", request.request_id, request.user_id, reason)
            self._emit("training_skipped", request, reason=reason)
            return True
        self._gather(request, next_offset)
        return False

    def _start(self, messages: list, target) -> None:
        """Run one long job in a thread while the main loop keeps polling with every partition paused."""
        self._pause_all()
        metrics.BUSY.set(1)
        job = _Job(messages, threading.Thread(target=lambda: None))
        first = messages[0][1]
        job.thread = threading.Thread(target=target, args=(job,), name=f"job-{first.topic}-{first.offset}", daemon=True)
        self.job = job
        job.thread.start()

    # ---- commands --------------------------------------------------------------- #

    def _rollback(self, command: RollbackCommand) -> None:
        done = [r for r in self.registry.rollback_log(command.user_id) if r.get("command_id") == command.command_id]
        if done:  # a redelivered command: say again what it did
            self._emit(
                "rolled_back",
                command,
                version=done[-1]["to_version"],
                previous_version=done[-1]["from_version"],
                reason=command.reason,
                details={"republished": True},
            )
            return
        try:
            new, previous = self.registry.rollback(
                command.user_id,
                command.reason,
                command.to_version,
                requested_by=command.requested_by,
                command_id=command.command_id,
            )
        except (RollbackError, StorageError) as exc:
            log.warning("rollback %s for %s not done: %s", command.command_id, command.user_id, exc)
            self._emit("command_failed", command, reason=reason_text(str(exc)), details={"command": "rollback"})
            return
        log.info("rolled %s back from %s to %s: %s", command.user_id, version_label(previous), version_label(new), command.reason)
        self._emit("rolled_back", command, version=new, previous_version=previous, reason=command.reason)

    def _review(self, command: ApproveCommand | DenyCommand) -> None:
        """Approve or deny a pending review; a redelivered command says again what it did."""
        try:
            review = self.registry.review(command.review_id)
            if review.command_id == command.command_id:
                self._announce_review(Decision(review), republished=True)
                return
            if review.user_id != command.user_id:
                raise ReviewError(f"review {review.review_id} is {review.user_id}'s, not {command.user_id}'s")
            approve = isinstance(command, ApproveCommand)
            decision = decide(self.registry, command.review_id, approve, command.requested_by, command.reason, command.command_id)
        except (ReviewError, StorageError) as exc:
            log.warning("%s %s not done: %s", command.type, command.command_id, exc)
            self._emit("command_failed", command, reason=reason_text(str(exc)), details={"command": command.type})
            return
        self._announce_review(decision)

    def _settle_reviews(self) -> None:
        """Decide the reviews past `review.timeout_h` (every trainer looks; the registry's lock lets one decide each)."""
        self.reviews_due = time.monotonic() + self.cfg.review_check_s
        try:
            decided = settle_overdue(self.registry, self.cfg.review_timeout_h, self.cfg.review_on_timeout)
        except StorageError as exc:
            log.error("overdue reviews not settled: %s", exc)
            return
        for decision in decided:
            self._announce_review(decision)

    def _republish_validation(self, command: ValidateCommand) -> bool:
        done = [r for r in self.registry.validation_results(command.user_id) if r.get("job_id") == command.command_id]
        if done:
            self._validated(command, done[-1], republished=True)
        return bool(done)

    def _validated(self, command: ValidateCommand, record: dict, republished: bool = False) -> None:
        numbers = {
            k: float(v) for k, v in record.get("metrics", {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self._emit(
            "validated",
            command,
            version=command.version,
            metrics=numbers,
            reason=reason_text("; ".join(record.get("reasons", []))) or None,
            details={
                "passed": record["passed"],
                "republished": republished,
                "command": "validate",
                "suites": {k: {n: v for n, v in s.items() if n != "case_scores"} for k, s in record.get("suites", {}).items()},
            },
        )

    def _validate(self, job: _Job) -> None:
        ((command, _),) = job.messages
        assert isinstance(command, ValidateCommand)
        try:
            if self.gate is None:
                raise AdaptloopError("this trainer runs without a validation gate")
            candidate = self.registry.verify(command.user_id, command.version)  # a tampered adapter is never loaded
            baseline = None
            if command.baseline_version is not None:
                baseline = self.registry.verify(command.user_id, command.baseline_version).path
            job.results[0] = validate_adapter(
                gate=self.gate,
                registry=self.registry,
                store=self.store,
                tests_dir=self.cfg.user_tests_dir,
                user_id=command.user_id,
                adapter=candidate.path,
                baseline=baseline,
                job_id=command.command_id,
                version=command.version,
            )
        except Exception as exc:  # reported by the main loop
            job.results[0] = exc

    def _checkpoint_dir(self, request: TrainingRequest) -> Path:
        return self.registry.checkpoint_dir(self.hasher(request.user_id), request.request_id)

    def _forgotten(self, request: TrainingRequest) -> str | None:
        """Why the request must not become a version: its user was forgotten after it was made; else None."""
        since = self.forgets.since(self.hasher(request.user_id))
        if since is not None and since >= request.created_at.timestamp():
            return "the user was forgotten"
        return None

    def _dataset(self, request: TrainingRequest) -> list[TrainingExample]:
        data = self.store.read_bytes(self.store.relative_from_uri(request.dataset.uri))
        if sha256_bytes(data) != request.dataset.sha256:
            raise AdaptloopError(f"dataset {request.dataset.uri} does not match its sha256")
        return from_jsonl(data)

    def _skip_reason(self, request: TrainingRequest) -> str | None:
        """Why the request is not worth training (nothing new), found before any training; None: train it."""
        if resumable_checkpoint(self._checkpoint_dir(request)) is not None:
            return None  # a job cut short: it had something to learn
        try:
            return skip_reason(self.registry, request.user_id, self._dataset(request))
        except (AdaptloopError, ValueError):
            return None  # the job itself reports the unreadable dataset as training_failed

    def _training_job(self, request: TrainingRequest) -> TrainingJob:
        examples = self._dataset(request)
        held_out = []
        if request.dataset.test_uri:
            held_out = from_jsonl(self.store.read_bytes(self.store.relative_from_uri(request.dataset.test_uri)))
        explicit = user_cases(self.store, self.cfg.user_tests_dir, request.user_id) if self.gate is not None else []
        return TrainingJob(
            request.user_id,
            examples,
            held_out,
            request.dataset.uri,
            request.dataset.sha256,
            request.trigger,
            request.request_id,
            list(request.lineage),
            explicit,
        )

    def _job_hooks(self, request: TrainingRequest) -> JobHooks:
        return JobHooks(
            self._checkpoint_dir(request),
            self._progress(request),
            should_stop=lambda: self.stop.is_set() or self.abort.is_set(),
            gating=lambda: self._emit("training_progress", request, wait=False, details={"phase": "gating"}),
            cancelled=lambda: self._forgotten(request),
        )

    def _train(self, job: _Job) -> None:
        """One request alone (`JobRunner.run`), or several users together (`JobRunner.run_batch`)."""
        requests = [request for request, _ in job.messages]
        with tempfile.TemporaryDirectory(prefix="adaptloop-job-") as tmp:
            if len(requests) == 1:
                try:
                    job.results[0] = self.runner.run(self._training_job(requests[0]), Path(tmp), self._job_hooks(requests[0]))
                except Exception as exc:  # reported by the main loop
                    job.results[0] = exc
                return
            jobs, places = [], []
            for place, request in enumerate(requests):
                try:
                    jobs.append((self._training_job(request), self._job_hooks(request)))
                    places.append(place)
                except Exception as exc:  # this user's dataset: the others go on
                    job.results[place] = exc
            try:
                for place, outcome in zip(places, self.runner.run_batch(jobs, Path(tmp))):
                    job.results[place] = outcome
            except Exception as exc:  # the batch as a whole
                for place in places:
                    job.results[place] = exc

    def _finish_job(self) -> None:
        """Say what became of each message of the job, then commit (see `_commit`) and read on."""
        job, self.job = self.job, None
        assert job is not None
        metrics.BUSY.set(0)
        self.abort.clear()
        done: list[Position] = []
        again: list[Position] = []
        for (message, position), result in zip(job.messages, job.results):
            if result is None:
                result = AdaptloopError("the job ended without a result")
            if isinstance(message, ValidateCommand):
                self._validate_finished(message, result)
            elif isinstance(result, TrainingSkipped):  # its user was forgotten while it trained
                log.info("request %s dropped: %s", message.request_id, result)
                remove_checkpoint(self._checkpoint_dir(message))
                self._emit("training_skipped", message, reason=reason_text(str(result)))
            elif isinstance(result, TrainingInterrupted):
                log.warning("request %s interrupted and checkpointed; it will resume", message.request_id)
                again.append(position)
                continue
            elif isinstance(result, Exception):
                log.error("request %s failed: %s", message.request_id, result)
                remove_checkpoint(self._checkpoint_dir(message))  # a retry of the same request starts afresh
                self._emit("training_failed", message, reason=reason_text(f"{type(result).__name__}: {result}"))
            else:
                assert isinstance(result, Outcome)
                info = result.info
                log.info("request %s -> %s v%d: %s", message.request_id, message.user_id, info.version, result.decision)
                self._announce(message, info, result.decision)
            done.append(position)
        if not self.pending:
            done, self.deferred = done + self.deferred, []
        self._commit(done, again)
        if not self.stop.is_set():
            self._resume_all()

    def _validate_finished(self, command: ValidateCommand, result) -> None:
        if isinstance(result, Exception):
            log.warning("validate %s failed: %s", command.command_id, result)
            failed = {"passed": False, "reasons": [f"{type(result).__name__}: {result}"], "metrics": {}}
            self.registry.log_validation(command.user_id, command.version, failed, kind="validate", job_id=command.command_id)
            self._validated(command, failed)
        else:
            assert isinstance(result, GateReport)
            self._validated(command, result.to_dict())

    def _commit(self, done: list[Position], again: list[Position]) -> None:
        """Per partition: past the last message done, or up to the first request to do again.

        Messages are read in order, so everything before an interrupted
        request is done and committing up to it is safe; it is read again
        from there (by whoever owns the partition next, or by this trainer,
        which seeks back when it still owns it: a batch stopped because
        another partition moved) and resumes from its checkpoint.
        """
        target: dict[tuple[str, int], int] = {}
        for p in done:
            target[(p.topic, p.partition)] = max(target.get((p.topic, p.partition), 0), p.offset)
        first_again: dict[tuple[str, int], int] = {}
        for p in again:
            first_again[(p.topic, p.partition)] = min(first_again.get((p.topic, p.partition), p.offset), p.offset - 1)
        target.update(first_again)
        for (topic, partition), offset in target.items():
            consumer = self._consumer_of(topic)
            if (topic, partition) not in {(p.topic, p.partition) for p in consumer.assignment()}:
                continue  # moved away: its new owner reads on from the last commit
            position = TopicPartition(topic, partition, offset)
            if (topic, partition) in first_again and not self.stop.is_set():
                consumer.seek(position)
            consumer.commit(offsets=[position], asynchronous=False)


def run_trainer(settings: Settings, metrics_port: int | None = None) -> None:
    """Run the trainer until SIGTERM/SIGINT (the topics must exist: `adaptloop trainer` ensures them)."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    cfg = TrainerConfig.from_settings(settings, metrics_port)
    base = resolve_base_model(settings.model.base_model, settings.model.gguf_file, settings.cache_dir)
    service = TrainerService(settings, cfg, base)
    lag = ConsumerLagCollector(
        cfg.client, {cfg.group_id: [cfg.requests_topic], trainer_commands_group(cfg.group_id): [cfg.commands_topic]}
    )
    metrics.serve(cfg.metrics_port, cfg.metrics_host, [lag])

    def stop(signum, _frame) -> None:
        log.info("signal %d: checkpointing and leaving the group", signum)
        service.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    service.run()
