"""`adaptloop trainer`: the training consumer, one process per GPU or CPU host.

    adaptloop trainer [--config PATH]

A confluent-kafka consumer group on `adapter.training-requests`
(cooperative-sticky assignment). Kafka spreads users over the trainers; a
user's requests sit in one partition, so one trainer handles them at a time.

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

from adaptloop.errors import AdaptloopError, InvalidMessage, KafkaOperationError
from adaptloop.kafka.client import ClientConfig
from adaptloop.storage import ArtifactStore, sha256_bytes
from schemas import DeadLetter, LifecycleEvent, TrainingRequest
from schemas.decode import decode
from streams.dataset import from_jsonl
from trainer.model import BaseModelRef, load_base
from trainer.offline import train_version
from trainer.registry import AdapterRegistry, VersionInfo
from trainer.train import TrainConfig

log = logging.getLogger("adaptloop.trainer")


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
    max_message_bytes: int = 1 << 20


@dataclass
class _Job:
    request: TrainingRequest
    partition: TopicPartition  # with the offset to commit when done
    thread: threading.Thread
    result: VersionInfo | None = None
    error: BaseException | None = None


class TrainerService:
    def __init__(self, cfg: TrainerConfig, base: BaseModelRef, dtype: str = "auto") -> None:
        self.cfg = cfg
        self.base = base
        self.model, self.tokenizer, self.device = load_base(base, dtype)  # once per process
        self.registry = AdapterRegistry(cfg.storage_root, cfg.max_versions)
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
                }
            )
        )
        self.producer = Producer(cfg.client.librdkafka(**{"enable.idempotence": True, "partitioner": "murmur2_random"}))

    # ---- lifecycle events -------------------------------------------------- #

    def _emit(self, kind: str, request: TrainingRequest, **fields) -> None:
        event = LifecycleEvent(
            event_id=f"{request.request_id}-{kind}-{uuid.uuid4().hex[:6]}", type=kind, user_id=request.user_id,
            request_id=request.request_id, job_id=request.command_id, **fields,
        )  # fmt: skip
        self.producer.produce(self.cfg.lifecycle_topic, key=request.user_id, value=event.to_bytes())
        if self.producer.flush(30):
            raise KafkaOperationError(f"lifecycle event {kind} for {request.request_id} not acknowledged")

    def _completed(self, request: TrainingRequest, info: VersionInfo, republished: bool = False) -> None:
        metrics = {k: float(v) for k, v in info.manifest.get("metrics", {}).items() if isinstance(v, (int, float))}
        self._emit("training_completed", request, version=info.version, metrics=metrics,
                   details={"republished": republished, "adapter": str(info.path), "status": "candidate"})  # fmt: skip

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

        self.consumer.subscribe([self.cfg.requests_topic], on_assign=on_assign, on_revoke=on_revoke)
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
        try:
            request = decode(TrainingRequest, msg.value(), self.cfg.max_message_bytes)
        except InvalidMessage as exc:
            letter = DeadLetter.of(topic=msg.topic(), partition=msg.partition(), offset=msg.offset(),
                                   key=msg.key(), value=msg.value(), reason=exc.reason)  # fmt: skip
            self.producer.produce(self.cfg.dlq_topic, key=msg.key(), value=letter.to_bytes())
            self.producer.flush(30)
            self.consumer.commit(offsets=[next_offset], asynchronous=False)
            return
        done = self.registry.find_by_request(request.user_id, request.request_id)
        if done is not None:
            log.info("request %s already produced %s v%d; republishing", request.request_id, request.user_id, done.version)
            self._completed(request, done, republished=True)
            self.consumer.commit(offsets=[next_offset], asynchronous=False)
            return
        self.consumer.pause(self.consumer.assignment())
        self._emit("training_started", request)
        job = _Job(request, next_offset, threading.Thread(target=lambda: None))
        job.thread = threading.Thread(target=self._train, args=(job,), name=f"train-{request.request_id[:8]}", daemon=True)
        self.job = job
        job.thread.start()

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
            checkpoint = self.registry.root / "checkpoints" / request.request_id
            with tempfile.TemporaryDirectory(prefix="adaptloop-job-") as tmp:
                job.result = train_version(
                    registry=self.registry, base=self.base, model=self.model, tokenizer=self.tokenizer,
                    device=self.device, user_id=request.user_id, examples=examples, held_out=held_out,
                    cfg=self.cfg.train, work_dir=Path(tmp), dataset_uri=request.dataset.uri,
                    dataset_sha256=request.dataset.sha256, trigger=request.trigger, request_id=request.request_id,
                    lineage=[r.model_dump() for r in request.lineage], checkpoint_dir=checkpoint,
                    show_progress=False, should_stop=lambda: self.stop.is_set() or self.abort.is_set(),
                )  # fmt: skip
        except BaseException as exc:  # reported by the main loop
            job.error = exc

    def _finish_job(self) -> None:
        job, self.job = self.job, None
        assert job is not None
        request = job.request
        self.abort.clear()
        if isinstance(job.error, InterruptedError):
            # Not committed: whoever owns the partition next gets the request again and resumes.
            log.warning("request %s interrupted and checkpointed; it will resume", request.request_id)
        elif job.error is not None:
            log.error("request %s failed: %s", request.request_id, job.error)
            self._emit("training_failed", request, reason=f"{type(job.error).__name__}: {job.error}"[:3900])
            self.consumer.commit(offsets=[job.partition], asynchronous=False)
        else:
            assert job.result is not None
            log.info("request %s -> %s v%d", request.request_id, request.user_id, job.result.version)
            self._completed(request, job.result)
            self.consumer.commit(offsets=[job.partition], asynchronous=False)
        if not self.stop.is_set():
            self.consumer.resume(self.consumer.assignment())


def run_trainer(cfg: TrainerConfig, base: BaseModelRef, dtype: str) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    service = TrainerService(cfg, base, dtype)

    def stop(signum, _frame) -> None:
        log.info("signal %d: checkpointing and leaving the group", signum)
        service.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    service.run()
