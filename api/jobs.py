"""Jobs and per-user views, materialised from Kafka by the API process (and, for one user, by `adaptloop status`).

A background thread reads, from the beginning and without a consumer group
(assign(); the API joins no group and commits nothing):
- `adapter.commands`: every retrain/validate/rollback command is a job, `queued`;
- `adapter.training-requests`: every training request (from any trigger) is a `RequestView`;
- `adapter.lifecycle`: events carrying a command's id as `job_id`, or a request's
  `request_id`, move them on;
- the worker's `<app_id>-users-changelog`: each user's pending gaps;
- `adapter.review-requests`: each user's open labelling tasks (streams/active.py).

Job status by kind:
- retrain: queued -> training -> gating -> validating -> promoted | rejected | awaiting_review | skipped | failed
- validate: queued -> validated (with `passed`) | failed
- rollback: queued -> rolled_back | failed
A request's state: queued -> training (with step/total/loss) -> gating -> deciding ->
promoted | rejected | awaiting_review | skipped (with the reason) | failed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from core.kafka.client import ClientConfig
from schemas.lifecycle import ENDS_COMMAND
from schemas.privacy import FORGOTTEN_PREFIX

log = logging.getLogger("adaptloop.api")

_STATUS_BY_EVENT = {
    "training_started": "training",
    "training_completed": "validating",
    "promoted": "promoted",
    "rejected": "rejected",
    "training_skipped": "skipped",
    "training_failed": "failed",
    "command_failed": "failed",
    "rolled_back": "rolled_back",
    "awaiting_review": "awaiting_review",
    "denied": "denied",
}


def _phase(event: dict[str, Any]) -> str:
    """The status a `training_progress` event means: training, or gating once the gate runs."""
    return "gating" if (event.get("details") or {}).get("phase") == "gating" else "training"


def _progress(event: dict[str, Any]) -> dict[str, Any] | None:
    details = event.get("details") or {}
    return {k: details[k] for k in ("step", "total", "loss") if k in details} or None


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class Job:
    job_id: str
    kind: str
    user_id: str
    status: str = "queued"
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)
    version: int | None = None
    passed: bool | None = None
    scores: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    ended: bool = False  # an event that ends this kind of command arrived (schemas.lifecycle.ENDS_COMMAND)
    progress: dict[str, Any] | None = None  # while training: step, total, loss

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type", "")
        at = event.get("timestamp") or _now()
        self.updated_at = at
        if kind == "training_progress":
            if not self.ended:
                self.status, self.progress = _phase(event), _progress(event) or self.progress
            return  # progress is a state, not an event worth listing
        self.events.append({"type": kind, "at": at, "version": event.get("version")})
        if self.ended and kind not in ("promoted", "rejected"):
            return  # a republished earlier step never moves a finished job back
        self.ended = self.ended or kind in ENDS_COMMAND.get(self.kind, ())
        if kind == "validated" and self.kind == "validate":
            self.status = "validated"
        else:
            self.status = _STATUS_BY_EVENT.get(kind, self.status)
        if event.get("version") is not None:
            self.version = event["version"]
        if event.get("metrics"):
            self.scores = {k: v for k, v in event["metrics"].items() if k.endswith("_score") or k == "facts_learned"}
        details = event.get("details") or {}
        if "passed" in details:
            self.passed = details["passed"]
        if event.get("reason"):
            self.reason = event["reason"]


OPEN_STATES = ("queued", "training", "gating", "deciding")
_REQUEST_STATE = {
    "training_started": "training",
    "training_completed": "deciding",
    "validated": "deciding",
    "promoted": "promoted",
    "rejected": "rejected",
    "awaiting_review": "awaiting_review",
    "training_skipped": "skipped",
    "training_failed": "failed",
}


@dataclass
class RequestView:
    """A training request and where it is: what `status` shows while a user's next version is on its way."""

    request_id: str
    user_id: str
    trigger: str | None = None
    requested_at: str | None = None
    state: str = "queued"
    progress: dict[str, Any] | None = None  # while training: step, total, loss
    version: int | None = None
    reason: str | None = None
    updated_at: str | None = None

    @property
    def open(self) -> bool:
        return self.state in OPEN_STATES

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type", "")
        self.updated_at = event.get("timestamp") or self.updated_at
        if not self.open:
            return  # a republished step never reopens a request
        if kind == "training_progress":
            self.state, self.progress = _phase(event), _progress(event) or self.progress
            return
        self.state = _REQUEST_STATE.get(kind, self.state)
        self.version = event.get("version") or self.version
        self.reason = event.get("reason") or self.reason

    def describe(self) -> str:
        """One line: `training (step 12/40, loss 0.312), trigger threshold, requested 2026-12-01T10:00:03`."""
        what = self.state
        if self.progress and self.state == "training":
            what += f" (step {self.progress.get('step')}/{self.progress.get('total')}, loss {self.progress.get('loss')})"
        elif self.version is not None and not self.open:
            what += f" v{self.version}"
        if self.reason and self.state in ("skipped", "failed"):
            what += f": {self.reason}"
        return f"{what}, trigger {self.trigger or '?'}, requested {(self.requested_at or '?')[:19]}"


class RequestBook:
    """Training requests by id and each user's latest, folded from the requests and lifecycle topics (any order)."""

    def __init__(self) -> None:
        self.by_id: dict[str, RequestView] = {}
        self.latest: dict[str, RequestView] = {}

    def request(self, body: dict[str, Any]) -> None:
        """A `TrainingRequest` (JSON) as published on the requests topic."""
        view = self._view(str(body["request_id"]), str(body["user_id"]), body.get("created_at"))
        view.trigger, view.requested_at = body.get("trigger"), body.get("created_at") or view.requested_at

    def lifecycle(self, body: dict[str, Any]) -> None:
        if body.get("request_id") and body.get("user_id"):
            self._view(str(body["request_id"]), str(body["user_id"]), body.get("timestamp")).apply(body)

    def of(self, user_id: str) -> RequestView | None:
        return self.latest.get(user_id)

    def forget(self, user_id: str) -> None:
        self.latest.pop(user_id, None)
        self.by_id = {rid: view for rid, view in self.by_id.items() if view.user_id != user_id}

    def _view(self, request_id: str, user_id: str, at: str | None) -> RequestView:
        view = self.by_id.get(request_id)
        if view is None:  # a lifecycle event may be read before its request: the request fills in the rest
            view = self.by_id[request_id] = RequestView(request_id, user_id, requested_at=at)
        latest = self.latest.get(user_id)
        if latest is None or _epoch(view.requested_at) >= _epoch(latest.requested_at):
            self.latest[user_id] = view
        return view


@dataclass
class Activity:
    """What the API reports across users, from the same topics."""

    trainings: list[float] = field(default_factory=list)  # training_completed times (epoch s)
    rollbacks: list[float] = field(default_factory=list)
    pending_gaps: dict[str, int] = field(default_factory=dict)
    opted_out: set[str] = field(default_factory=set)  # users who opted out of training, as the worker applied it
    last_training: dict[str, dict[str, Any]] = field(default_factory=dict)

    def forget(self, user_id: str) -> None:
        self.pending_gaps.pop(user_id, None)
        self.opted_out.discard(user_id)
        self.last_training.pop(user_id, None)


class JobTracker:
    def __init__(
        self,
        client: ClientConfig,
        commands_topic: str,
        lifecycle_topic: str,
        users_changelog: str | None,
        requests_topic: str | None = None,
        review_requests_topic: str | None = None,
    ) -> None:
        self.client = client
        self.topics = [t for t in (commands_topic, lifecycle_topic, requests_topic, users_changelog, review_requests_topic) if t]
        self.review_requests_topic = review_requests_topic
        self.tasks: dict[str, dict[str, dict[str, Any]]] = {}  # user -> task id -> the open task
        self.commands_topic, self.lifecycle_topic, self.users_changelog = commands_topic, lifecycle_topic, users_changelog
        self.requests_topic = requests_topic
        self.requests = RequestBook()
        self.jobs: dict[str, Job] = {}
        self.activity = Activity()
        self._seen_events: set[str] = set()  # a reconnect re-reads from the start: apply each event once
        # user -> forget time (epoch s): their older messages, read later from another topic, are not views again
        self._forgotten: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.caught_up = threading.Event()
        self.thread = threading.Thread(target=self._run, name="job-tracker", daemon=True)

    def start(self) -> JobTracker:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)

    # ---- what the API asks --------------------------------------------------- #

    def add(self, job_id: str, kind: str, user_id: str) -> Job:
        with self.lock:
            return self.jobs.setdefault(job_id, Job(job_id, kind, user_id))

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def open_tasks(self, user_id: str) -> list[dict[str, Any]]:
        """The user's labelling tasks still open (not answered, not past their expiry), oldest first."""
        now = time.time()
        with self.lock:
            tasks = list(self.tasks.get(user_id, {}).values())
        return sorted((t for t in tasks if _epoch(t.get("expires_at")) > now), key=lambda t: str(t.get("created_at")))

    def counts(self) -> dict[str, int]:
        with self.lock:
            out: dict[str, int] = {}
            for job in self.jobs.values():
                out[job.status] = out.get(job.status, 0) + 1
            return out

    # ---- the reader ------------------------------------------------------------ #

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self._consume()
            except Exception as exc:  # the broker went away: say so, retry, keep serving what we have
                log.warning("job tracker: %s; retrying in 2 s", exc)
                time.sleep(2)

    def _consume(self) -> None:
        consumer = Consumer(
            self.client.librdkafka(
                **{"group.id": "adaptloop-api-reader", "enable.auto.commit": False, "enable.partition.eof": True}
            )
        )
        try:
            assigned: set[str] = set()
            assignment: list[TopicPartition] = []
            at_end: set[tuple[str, int]] = set()
            next_check = 0.0
            while not self.stop.is_set():
                if len(assigned) < len(self.topics) and time.monotonic() >= next_check:
                    # A topic created later (the worker's changelog, say) is picked up when it appears.
                    metadata = consumer.list_topics(timeout=10)
                    new = [
                        TopicPartition(t, p, 0)
                        for t in self.topics
                        if t not in assigned and t in metadata.topics
                        for p in metadata.topics[t].partitions
                    ]
                    if new:
                        consumer.incremental_assign(new)
                        assignment += new
                        assigned |= {tp.topic for tp in new}
                    next_check = time.monotonic() + 10
                    if not assignment:
                        self.caught_up.set()  # nothing to read yet
                        time.sleep(0.5)
                        continue
                msg = consumer.poll(0.5)
                if msg is None:
                    continue
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        at_end.add((msg.topic(), msg.partition()))
                        if len(at_end) >= len(assignment):
                            self.caught_up.set()
                        continue
                    raise RuntimeError(str(msg.error()))
                self._apply(msg.topic(), msg.key(), msg.value())
        finally:
            consumer.close()

    def _apply(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        try:
            body = json.loads(value) if value is not None else None
        except ValueError:
            return  # not ours to judge: the worker dead-letters bad commands
        with self.lock:
            if self._about_forgotten(topic, key, body):
                return
            if topic == self.users_changelog:
                if key is not None:
                    user = key.decode(errors="replace")
                    self.activity.pending_gaps[user] = len(body.get("gaps", [])) if isinstance(body, dict) else 0
                    if isinstance(body, dict) and body.get("training_consent") is False:
                        self.activity.opted_out.add(user)
                    else:
                        self.activity.opted_out.discard(user)
            elif not isinstance(body, dict):
                return
            elif topic == self.commands_topic and body.get("type") == "forget" and isinstance(body.get("user_id"), str):
                self._forget(body["user_id"], _epoch(body.get("requested_at")))
            elif (
                topic == self.commands_topic
                and body.get("command_id")
                and body.get("user_id")
                and body.get("type") not in ("consent", "forget")
            ):
                job = self.jobs.setdefault(body["command_id"], Job(body["command_id"], str(body.get("type")), body["user_id"]))
                job.created_at = body.get("requested_at") or job.created_at
            elif topic == self.lifecycle_topic:
                self._lifecycle(body)
            elif topic == self.requests_topic and body.get("request_id") and body.get("user_id"):
                self.requests.request(body)
            elif topic == self.review_requests_topic and body.get("review_request_id") and body.get("user_id"):
                self._task(body)

    def _task(self, body: dict[str, Any]) -> None:
        tasks = self.tasks.setdefault(body["user_id"], {})
        if body.get("status") == "open":
            tasks[body["review_request_id"]] = body
        else:  # answered or expired
            tasks.pop(body["review_request_id"], None)

    def _forget(self, user_id: str, at: float) -> None:
        """A forget command: nothing of the user stays in this process's views."""
        self._forgotten[user_id] = max(at, self._forgotten.get(user_id, 0.0))
        self.tasks.pop(user_id, None)
        self.activity.forget(user_id)
        self.requests.forget(user_id)
        self.jobs = {job_id: job for job_id, job in self.jobs.items() if job.user_id != user_id}

    def _about_forgotten(self, topic: str, key: bytes | None, body: Any) -> bool:
        """A message about a forgotten user from before the forget (or a worker's marker key): skip it."""
        if topic == self.users_changelog:
            return key is not None and key.startswith(FORGOTTEN_PREFIX)  # the worker's forget markers, keyed by salted hash
        if not isinstance(body, dict) or body.get("user_id") not in self._forgotten or body.get("type") == "forget":
            return False
        at = body.get("timestamp") or body.get("requested_at") or body.get("created_at")
        return _epoch(at) <= self._forgotten[body["user_id"]]

    def _lifecycle(self, event: dict[str, Any]) -> None:
        event_id = str(event.get("event_id"))
        if event_id in self._seen_events:
            return
        self._seen_events.add(event_id)
        kind, at = event.get("type"), _epoch(event.get("timestamp"))
        if kind == "training_completed" and not (event.get("details") or {}).get("republished"):
            self.activity.trainings.append(at)
            self.activity.last_training[event.get("user_id", "")] = {
                "at": event.get("timestamp"),
                "version": event.get("version"),
                "request_id": event.get("request_id"),
            }
        elif kind == "rolled_back" and not (event.get("details") or {}).get("republished"):
            self.activity.rollbacks.append(at)
        self.requests.lifecycle(event)
        job = self.jobs.get(event.get("job_id") or "")
        if job is not None:
            job.apply(event)


def _epoch(timestamp: str | None) -> float:
    if timestamp is None:
        return 0.0
    try:
        return datetime.fromisoformat(str(timestamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()
