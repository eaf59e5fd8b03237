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
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from adaptloop.errors import AdaptloopError, InvalidMessage, KafkaOperationError, RollbackError, StorageError
from adaptloop.kafka.client import ClientConfig
from adaptloop.kafka.lag import ConsumerLagCollector
from adaptloop.storage import ArtifactStore, sha256_bytes
from schemas import COMMAND_ADAPTER, Command, DeadLetter, LifecycleEvent, RollbackCommand, TrainingRequest, ValidateCommand
from schemas.decode import decode
from streams.dataset import from_jsonl
from trainer.anchors import AnchorMix, AnchorSet
from trainer import metrics
from trainer.gate import GateReport, GateSpec
from trainer.model import BaseModelRef, load_base
from trainer.offline import Outcome, apply_decision, train_version, user_cases, validate_adapter
from trainer.registry import AdapterRegistry, VersionInfo, version_label
from trainer.train import TrainConfig, remove_checkpoint

log = logging.getLogger("adaptloop.trainer")


def _numbers(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass(frozen=True)
class TrainerConfig:
    client: ClientConfig
    group_id: str
    requests_topic: str
    lifecycle_topic: str
    dlq_topic: str
    storage_root: str
    max_versions: int
    train: TrainConfig
    gate: GateSpec | None  # None: versions stay candidates (never promoted)
    commands_topic: str | None = None
    cache_dir: Path = Path.home() / ".cache" / "adaptloop"
    anchor_prompts: tuple[str, ...] = ()
    anchor_mix: AnchorMix = AnchorMix()
    embedding_model: str | None = None  # chooses the anchors nearest the user's prompts; None: a random sample
    max_message_bytes: int = 1 << 20
    metrics_port: int = 0  # 0: no metrics endpoint
    metrics_host: str = "127.0.0.1"
    session_timeout_s: float = 45.0


@dataclass
class _Job:
    request: TrainingRequest | ValidateCommand
    partition: TopicPartition  # with the offset to commit when done
    thread: threading.Thread
    result: Outcome | GateReport | None = None
    error: BaseException | None = None


class TrainerService:
    def __init__(self, cfg: TrainerConfig, base: BaseModelRef, dtype: str = "auto") -> None:
        self.cfg = cfg
        self.base = base
        self.model, self.tokenizer, self.device = load_base(base, dtype)  # once per process
        self.registry = AdapterRegistry(cfg.storage_root, cfg.max_versions)
        self.store = ArtifactStore(cfg.storage_root)
        self.gate = cfg.gate.build(self.model, self.tokenizer, self.device, base.sha256) if cfg.gate is not None else None
        self.anchors = AnchorSet(list(cfg.anchor_prompts), cfg.cache_dir, base.sha256, cfg.embedding_model) if cfg.anchor_prompts else None
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

    def _emit(self, kind: str, about: TrainingRequest | Command, **fields) -> None:
        """Publish one lifecycle event and wait for its acknowledgement."""
        if isinstance(about, TrainingRequest):
            ids = {"request_id": about.request_id, "job_id": about.command_id}
            prefix = about.request_id
        else:
            ids, prefix = {"job_id": about.command_id}, about.command_id
        event = LifecycleEvent(event_id=f"{prefix}-{kind}-{uuid.uuid4().hex[:6]}"[-128:], type=kind,
                               user_id=about.user_id, **ids, **fields)  # fmt: skip
        self.producer.produce(self.cfg.lifecycle_topic, key=about.user_id, value=event.to_bytes())
        if self.producer.flush(30):
            raise KafkaOperationError(f"lifecycle event {kind} for {prefix} not acknowledged")
        metrics.LIFECYCLE.labels(kind).inc()

    def _announce(self, request: TrainingRequest, info: VersionInfo, decision: str, republished: bool = False) -> None:
        """training_completed, then the gate's verdict: validated + promoted | rejected."""
        manifest = info.manifest
        metrics_of = _numbers(manifest.get("metrics", {}))
        details = {"republished": republished, "adapter": str(info.path)}
        if not republished:
            metrics.TRAIN_SECONDS.observe(metrics_of.get("train_seconds", 0.0))
            metrics.TOKENS.inc(metrics_of.get("tokens", 0))
        self._emit("training_completed", request, version=info.version, metrics=metrics_of, details=details)
        validation = manifest.get("validation")
        if validation is None:
            return
        details = {**details, "passed": validation["passed"], "suites": validation["suites"]}
        self._emit("validated", request, version=info.version, metrics=metrics_of, details=details)
        if decision == "promoted":
            self._emit("promoted", request, version=info.version, previous_version=validation.get("reference_version"),
                       metrics=metrics_of, details=details)  # fmt: skip
        else:
            self._emit("rejected", request, version=info.version, metrics=metrics_of, details=details,
                       reason="; ".join(validation["reasons"])[:3900])  # fmt: skip

    # ---- the loop ------------------------------------------------------------ #

    def run(self) -> None:
        def on_assign(consumer, partitions):
            if self.job is not None:
                consumer.pause(partitions)  # one job at a time

        def on_revoke(consumer, partitions):
            job = self.job
            if job is not None and any(p.topic == job.partition.topic and p.partition == job.partition.partition for p in partitions):
                log.warning("partition of the running job was revoked; checkpointing and handing it over")
                self.abort.set()

        topics = [self.cfg.requests_topic] + ([self.cfg.commands_topic] if self.cfg.commands_topic else [])
        self.consumer.subscribe(topics, on_assign=on_assign, on_revoke=on_revoke)
        log.info("trainer ready: group %s, topic %s, base model %s", self.cfg.group_id, self.cfg.requests_topic, self.base.model_id)
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
                letter = DeadLetter.of(topic=msg.topic(), partition=msg.partition(), offset=msg.offset(),
                                       key=msg.key(), value=msg.value(), reason=exc.reason)  # fmt: skip
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
        elif isinstance(message, TrainingRequest):
            done = self.registry.find_by_request(message.user_id, message.request_id)
            if done is None:
                self._emit("training_started", message)
                self._start(message, next_offset, self._train)
                return
            log.info("request %s already produced %s v%d; republishing", message.request_id, message.user_id, done.version)
            remove_checkpoint(self._checkpoint_dir(message))  # left behind when a kill came right after registering
            self._announce(message, done, apply_decision(self.registry, done, job_id=message.command_id), republished=True)
        self.consumer.commit(offsets=[next_offset], asynchronous=False)

    def _start(self, message, next_offset: TopicPartition, target) -> None:
        """Run one long job in a thread while the main loop keeps polling with every partition paused."""
        self.consumer.pause(self.consumer.assignment())
        metrics.BUSY.set(1)
        job = _Job(message, next_offset, threading.Thread(target=lambda: None))
        job.thread = threading.Thread(target=target, args=(job,), name=f"job-{next_offset.topic}-{next_offset.offset}", daemon=True)
        self.job = job
        job.thread.start()

    # ---- commands --------------------------------------------------------------- #

    def _rollback(self, command: RollbackCommand) -> None:
        done = [r for r in self.registry.rollback_log(command.user_id) if r.get("command_id") == command.command_id]
        if done:  # a redelivered command: say again what it did
            self._emit("rolled_back", command, version=done[-1]["to_version"], previous_version=done[-1]["from_version"],
                       reason=command.reason, details={"republished": True})  # fmt: skip
            return
        try:
            new, previous = self.registry.rollback(command.user_id, command.reason, command.to_version,
                                                   requested_by=command.requested_by, command_id=command.command_id)  # fmt: skip
        except (RollbackError, StorageError) as exc:
            log.warning("rollback %s for %s not done: %s", command.command_id, command.user_id, exc)
            self._emit("command_failed", command, reason=str(exc)[:3900], details={"command": "rollback"})
            return
        log.info("rolled %s back from %s to %s: %s", command.user_id, version_label(previous), version_label(new), command.reason)
        self._emit("rolled_back", command, version=new, previous_version=previous, reason=command.reason)

    def _republish_validation(self, command: ValidateCommand) -> bool:
        done = [r for r in self.registry.validation_results(command.user_id) if r.get("job_id") == command.command_id]
        if done:
            self._validated(command, done[-1], republished=True)
        return bool(done)

    def _validated(self, command: ValidateCommand, record: dict, republished: bool = False) -> None:
        self._emit("validated", command, version=command.version, metrics=_numbers(record.get("metrics", {})),
                   reason="; ".join(record.get("reasons", []))[:3900] or None,
                   details={"passed": record["passed"], "republished": republished, "command": "validate",
                            "suites": {k: {n: v for n, v in s.items() if n != "case_scores"} for k, s in record.get("suites", {}).items()}})  # fmt: skip

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
            job.result = validate_adapter(gate=self.gate, registry=self.registry, store=self.store,
                                          tests_dir=self.cfg.gate.user_tests_dir, user_id=command.user_id,
                                          adapter=candidate.path, baseline=baseline, job_id=command.command_id,
                                          version=command.version)  # fmt: skip
        except BaseException as exc:  # reported by the main loop
            job.error = exc

    def _checkpoint_dir(self, request: TrainingRequest) -> Path:
        return self.registry.root / "checkpoints" / request.request_id

    def _train(self, job: _Job) -> None:
        request = job.request
        try:
            data = self.store.read_bytes(self.store.relative_from_uri(request.dataset.uri))
            if sha256_bytes(data) != request.dataset.sha256:
                raise AdaptloopError(f"dataset {request.dataset.uri} does not match its sha256")
            examples = from_jsonl(data)
            held_out = []
            if request.dataset.test_uri:
                held_out = from_jsonl(self.store.read_bytes(self.store.relative_from_uri(request.dataset.test_uri)))
            checkpoint = self._checkpoint_dir(request)
            explicit = user_cases(self.store, self.cfg.gate.user_tests_dir, request.user_id) if self.cfg.gate else []
            with tempfile.TemporaryDirectory(prefix="adaptloop-job-") as tmp:
                job.result = train_version(
                    registry=self.registry, base=self.base, model=self.model, tokenizer=self.tokenizer,
                    device=self.device, user_id=request.user_id, examples=examples, held_out=held_out,
                    cfg=self.cfg.train, work_dir=Path(tmp), dataset_uri=request.dataset.uri,
                    dataset_sha256=request.dataset.sha256, trigger=request.trigger, request_id=request.request_id,
                    lineage=[r.model_dump() for r in request.lineage], checkpoint_dir=checkpoint,
                    show_progress=False, should_stop=lambda: self.stop.is_set() or self.abort.is_set(),
                    gate=self.gate, explicit_cases=explicit, anchors=self.anchors, anchor_mix=self.cfg.anchor_mix,
                )  # fmt: skip
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
        elif isinstance(job.error, InterruptedError):
            # Not committed: whoever owns the partition next gets the request again and resumes.
            log.warning("request %s interrupted and checkpointed; it will resume", request.request_id)
        elif job.error is not None:
            log.error("request %s failed: %s", request.request_id, job.error)
            remove_checkpoint(self._checkpoint_dir(request))  # a retry of the same request starts afresh
            self._emit("training_failed", request, reason=f"{type(job.error).__name__}: {job.error}"[:3900])
            self.consumer.commit(offsets=[job.partition], asynchronous=False)
        else:
            assert isinstance(job.result, Outcome)
            info = job.result.info
            log.info("request %s -> %s v%d: %s", request.request_id, request.user_id, info.version, job.result.decision)
            self._announce(request, info, job.result.decision)
            self.consumer.commit(offsets=[job.partition], asynchronous=False)
        if not self.stop.is_set():
            self.consumer.resume(self.consumer.assignment())


def run_trainer(cfg: TrainerConfig, base: BaseModelRef, dtype: str) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    service = TrainerService(cfg, base, dtype)
    lag = ConsumerLagCollector(cfg.client, {cfg.group_id: [cfg.requests_topic] + ([cfg.commands_topic] if cfg.commands_topic else [])})
    metrics.serve(cfg.metrics_port, cfg.metrics_host, [lag])

    def stop(signum, _frame) -> None:
        log.info("signal %d: checkpointing and leaving the group", signum)
        service.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    service.run()
