"""`adaptloop trainer`: the training consumer, one process per GPU or CPU host.

    adaptloop trainer [--config PATH]

A confluent-kafka consumer group on `adapter.training-requests` and
`adapter.commands` (cooperative-sticky assignment). Kafka spreads users over
the trainers; a user's requests sit in one partition, so one trainer handles
them at a time.

Per request: train -> validation gate -> register -> promote or reject, with
lifecycle events `training_started`, `training_completed`, `validated`, then
`promoted` or `rejected`. Commands: `validate` runs the gate on a registered
version (report only), `rollback` swaps the active pointer back; `retrain` is
the streams worker's. Commands are idempotent by `command_id` (the
validation and rollback logs record it).

Delivery:
- One job at a time. Training runs in a worker thread while the main loop
  keeps polling with every assigned partition paused, so a long job never gets
  the consumer thrown out of its group.
- The offset is committed only after the outcome (a registered version, or a
  failure) is recorded and its lifecycle event acknowledged: at-least-once.
- Idempotent by `request_id`: a redelivered request whose version exists
  republishes `training_completed` and trains nothing.
- Checkpoints every N steps under `models/adapters/checkpoints/<request_id>/`;
  a request redelivered after a crash resumes from its last checkpoint.
- SIGTERM/SIGINT: the running job checkpoints, nothing is committed, the
  consumer leaves the group cleanly; the request is picked up again later.
"""

from __future__ import annotations

import logging
import signal
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from core.errors import AdaptloopError, InvalidMessage, KafkaOperationError, RollbackError, StorageError, TrainingInterrupted
from core.kafka.client import ClientConfig
from core.kafka.lag import ConsumerLagCollector
from core.settings import Settings
from core.storage import ArtifactStore, sha256_bytes
from schemas import (
    COMMAND_ADAPTER,
    Command,
    DeadLetter,
    LifecycleEvent,
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
from trainer.train import StepReport, remove_checkpoint

log = logging.getLogger("adaptloop.trainer")


@dataclass(frozen=True)
class TrainerConfig:
    """The service's own plain values; the training job itself is built from the settings (`runner_from_settings`)."""

    client: ClientConfig
    group_id: str
    requests_topic: str
    commands_topic: str
    lifecycle_topic: str
    dlq_topic: str
    storage_root: str
    user_tests_dir: str
    metrics_port: int  # 0: no metrics endpoint
    metrics_host: str
    session_timeout_s: float
    max_message_bytes: int = 1 << 20

    @classmethod
    def from_settings(cls, settings: Settings, metrics_port: int | None = None) -> TrainerConfig:
        t = settings.topics
        return cls(
            client=ClientConfig.from_settings(settings.kafka),
            group_id=settings.training.group_id,
            requests_topic=t.training_requests.name,
            commands_topic=t.commands.name,
            lifecycle_topic=t.lifecycle.name,
            dlq_topic=t.dlq.name,
            storage_root=settings.storage_root,
            user_tests_dir=settings.validation.user_tests_dir,
            metrics_port=settings.training.metrics_port if metrics_port is None else metrics_port,
            metrics_host=settings.training.metrics_host,
            session_timeout_s=settings.kafka.session_timeout_s,
        )


@dataclass
class _Job:
    request: TrainingRequest | ValidateCommand
    partition: TopicPartition  # with the offset to commit when done
    thread: threading.Thread
    result: Outcome | GateReport | None = None
    error: BaseException | None = None


class TrainerService:
    def __init__(self, settings: Settings, cfg: TrainerConfig, base: BaseModelRef) -> None:
        self.cfg = cfg
        self.base = base
        self.model, self.tokenizer, self.device = load_base(base, settings.model.dtype)  # once per process
        self.runner = runner_from_settings(settings, base, self.model, self.tokenizer, self.device)
        self.registry, self.gate = self.runner.registry, self.runner.gate
        self.store = ArtifactStore(cfg.storage_root)
        self.stop = threading.Event()  # the process is stopping
        self.abort = threading.Event()  # the running job's partition was revoked
        self.job: _Job | None = None
        self.consumer = Consumer(
            cfg.client.librdkafka(
                **{
                    "group.id": cfg.group_id,
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "partition.assignment.strategy": "cooperative-sticky",
                    "max.poll.interval.ms": 300_000,
                    "session.timeout.ms": int(cfg.session_timeout_s * 1000),
                    "heartbeat.interval.ms": int(min(3.0, cfg.session_timeout_s / 3) * 1000),
                }
            )
        )
        self.producer = Producer(cfg.client.librdkafka(**{"enable.idempotence": True, "partitioner": "murmur2_random"}))

    # ---- lifecycle events -------------------------------------------------- #

    def _emit(self, kind: str, about: TrainingRequest | Command, wait: bool = True, **fields) -> None:
        """Publish one lifecycle event and wait for its acknowledgement (`wait=False`: progress, sent in the background)."""
        if isinstance(about, TrainingRequest):
            ids = {"request_id": about.request_id, "job_id": about.command_id}
            prefix = about.request_id
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
        self._emit("validated", request, version=info.version, metrics=metrics_of, details=details)
        if decision == "promoted":
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

    # ---- the loop ------------------------------------------------------------ #

    def run(self) -> None:
        def on_assign(consumer, partitions):
            if self.job is not None:
                consumer.pause(partitions)  # one job at a time

        def on_revoke(consumer, partitions):
            job = self.job
            if job is not None and any(
                p.topic == job.partition.topic and p.partition == job.partition.partition for p in partitions
            ):
                log.warning("partition of the running job was revoked; checkpointing and handing it over")
                self.abort.set()

        topics = [self.cfg.requests_topic, self.cfg.commands_topic]
        self.consumer.subscribe(topics, on_assign=on_assign, on_revoke=on_revoke)
        log.info(
            "trainer ready: group %s, topic %s, base model %s", self.cfg.group_id, self.cfg.requests_topic, self.base.model_id
        )
        try:
            while True:
                if self.job is not None and not self.job.thread.is_alive():
                    self._finish_job()
                if self.stop.is_set() and self.job is None:
                    break
                msg = self.consumer.poll(0.5)
                if msg is None or self.stop.is_set():
                    continue
                if msg.error():
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        log.error("consumer error: %s", msg.error())
                    continue
                self._handle(msg)
        finally:
            self.consumer.close()  # leaves the group cleanly
            self.producer.flush(30)

    def _handle(self, msg) -> None:
        next_offset = TopicPartition(msg.topic(), msg.partition(), msg.offset() + 1)
        is_command = msg.topic() == self.cfg.commands_topic
        try:
            message = decode(COMMAND_ADAPTER if is_command else TrainingRequest, msg.value(), self.cfg.max_message_bytes)
        except InvalidMessage as exc:
            if not is_command:  # the streams worker dead-letters bad commands; one letter per message is enough
                letter = DeadLetter.of(
                    topic=msg.topic(),
                    partition=msg.partition(),
                    offset=msg.offset(),
                    key=msg.key(),
                    value=msg.value(),
                    reason=exc.reason,
                )
                self.producer.produce(self.cfg.dlq_topic, key=msg.key(), value=letter.to_bytes())
                self.producer.flush(30)
            self.consumer.commit(offsets=[next_offset], asynchronous=False)
            return
        if isinstance(message, RollbackCommand):
            self._rollback(message)
        elif isinstance(message, ValidateCommand):
            if not self._republish_validation(message):
                self._start(message, next_offset, self._validate)
                return
        elif isinstance(message, TrainingRequest) and not self._request(message, next_offset):
            return  # a job started: its offset is committed when it ends
        self.consumer.commit(offsets=[next_offset], asynchronous=False)

    def _request(self, request: TrainingRequest, next_offset: TopicPartition) -> bool:
        """Start the request's job (False), or answer it at once (True: commit): a version it already produced, or a skip."""
        done = self.registry.find_by_request(request.user_id, request.request_id)
        if done is not None:
            log.info("request %s already produced %s v%d; republishing", request.request_id, request.user_id, done.version)
            remove_checkpoint(self._checkpoint_dir(request))  # left behind when a kill came right after registering
            self._announce(request, done, apply_decision(self.registry, done, job_id=request.command_id), republished=True)
            return True
        reason = self._skip_reason(request)
        if reason is not None:
            log.info("request %s for %s skipped: %s", request.request_id, request.user_id, reason)
            self._emit("training_skipped", request, reason=reason)
            return True
        self._emit("training_started", request)
        self._start(request, next_offset, self._train)
        return False

    def _start(self, message, next_offset: TopicPartition, target) -> None:
        """Run one long job in a thread while the main loop keeps polling with every partition paused."""
        self.consumer.pause(self.consumer.assignment())
        metrics.BUSY.set(1)
        job = _Job(message, next_offset, threading.Thread(target=lambda: None))
        job.thread = threading.Thread(
            target=target, args=(job,), name=f"job-{next_offset.topic}-{next_offset.offset}", daemon=True
        )
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
        command = job.request
        assert isinstance(command, ValidateCommand)
        try:
            if self.gate is None:
                raise AdaptloopError("this trainer runs without a validation gate")
            candidate = self.registry.verify(command.user_id, command.version)  # a tampered adapter is never loaded
            baseline = None
            if command.baseline_version is not None:
                baseline = self.registry.verify(command.user_id, command.baseline_version).path
            job.result = validate_adapter(
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
        except BaseException as exc:  # reported by the main loop
            job.error = exc

    def _checkpoint_dir(self, request: TrainingRequest) -> Path:
        return self.registry.root / "checkpoints" / request.request_id

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

    def _train(self, job: _Job) -> None:
        request = job.request
        try:
            examples = self._dataset(request)
            held_out = []
            if request.dataset.test_uri:
                held_out = from_jsonl(self.store.read_bytes(self.store.relative_from_uri(request.dataset.test_uri)))
            explicit = user_cases(self.store, self.cfg.user_tests_dir, request.user_id) if self.gate is not None else []
            training = TrainingJob(
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
            with tempfile.TemporaryDirectory(prefix="adaptloop-job-") as tmp:
                job.result = self.runner.run(
                    training,
                    Path(tmp),
                    self._checkpoint_dir(request),
                    self._progress(request),
                    should_stop=lambda: self.stop.is_set() or self.abort.is_set(),
                    gating=lambda: self._emit("training_progress", request, wait=False, details={"phase": "gating"}),
                )
        except BaseException as exc:  # reported by the main loop
            job.error = exc

    def _finish_job(self) -> None:
        job, self.job = self.job, None
        assert job is not None
        metrics.BUSY.set(0)
        request = job.request
        self.abort.clear()
        if isinstance(request, ValidateCommand):
            if job.error is not None:
                log.warning("validate %s failed: %s", request.command_id, job.error)
                failed = {"passed": False, "reasons": [f"{type(job.error).__name__}: {job.error}"], "metrics": {}}
                self.registry.log_validation(request.user_id, request.version, failed, kind="validate", job_id=request.command_id)
                self._validated(request, failed)
            else:
                assert isinstance(job.result, GateReport)
                self._validated(request, job.result.to_dict())
            self.consumer.commit(offsets=[job.partition], asynchronous=False)
        elif isinstance(job.error, TrainingInterrupted):
            # Not committed: whoever owns the partition next gets the request again and resumes.
            log.warning("request %s interrupted and checkpointed; it will resume", request.request_id)
        elif job.error is not None:
            log.error("request %s failed: %s", request.request_id, job.error)
            remove_checkpoint(self._checkpoint_dir(request))  # a retry of the same request starts afresh
            self._emit("training_failed", request, reason=reason_text(f"{type(job.error).__name__}: {job.error}"))
            self.consumer.commit(offsets=[job.partition], asynchronous=False)
        else:
            assert isinstance(job.result, Outcome)
            info = job.result.info
            log.info("request %s -> %s v%d: %s", request.request_id, request.user_id, info.version, job.result.decision)
            self._announce(request, info, job.result.decision)
            self.consumer.commit(offsets=[job.partition], asynchronous=False)
        if not self.stop.is_set():
            self.consumer.resume(self.consumer.assignment())


def run_trainer(settings: Settings, metrics_port: int | None = None) -> None:
    """Run the trainer until SIGTERM/SIGINT (the topics must exist: `adaptloop trainer` ensures them)."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    cfg = TrainerConfig.from_settings(settings, metrics_port)
    base = resolve_base_model(settings.model.base_model, settings.model.gguf_file, settings.cache_dir)
    service = TrainerService(settings, cfg, base)
    lag = ConsumerLagCollector(cfg.client, {cfg.group_id: [cfg.requests_topic, cfg.commands_topic]})
    metrics.serve(cfg.metrics_port, cfg.metrics_host, [lag])

    def stop(signum, _frame) -> None:
        log.info("signal %d: checkpointing and leaving the group", signum)
        service.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    service.run()
