"""The worker's per-user logic, independent of Faust: envelopes in, requests out.

The Faust agent (streams/app.py) validates every source message into an
`Envelope`, groups a batch's envelopes by user, and hands each user's list to
`UserProcessor.handle` with that user's state, which it then writes back
once. `adaptloop replay` and `adaptloop generate-data` feed the very same
processor from records they read themselves, so live, replayed and offline
datasets are built by one code path.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from core.redaction import Redactor
from core.settings import ActiveLearningSettings, CurationSettings, Settings, defaults
from core.storage import ArtifactStore
from schemas.commands import RollbackCommand
from schemas.lifecycle import ENDS_REQUEST, LifecycleEvent
from schemas.review_requests import ReviewRequest
from schemas.training import OffsetRange, TrainingExample, TrainingRequest, request_id_for
from streams.active import Budget, Closed, as_message, expire, note, note_missed_cases, open_tasks
from streams.curation import GLOBAL_USER, augment, curate, dedupe, redact_curated, without_training
from streams.dataset import DatasetConfig, build_dataset, lineage, read_examples, read_global, write_dataset, write_global
from streams.envelope import Envelope
from streams.state import (
    DeferredCommand,
    OpenRequest,
    UserLog,
    UserState,
    accuracy,
    add_pending,
    apply_event,
    clear_pending,
    pending_examples,
    prune_gaps,
)
from streams.triggers import TriggerConfig, automatic_trigger, nightly_trigger

log = logging.getLogger(__name__)


def _timestamp(body: dict[str, Any], default: float) -> float:
    try:
        return datetime.fromisoformat(str(body["timestamp"]).replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return default


@dataclass(frozen=True)
class ProcessorConfig:
    curation: CurationSettings
    triggers: TriggerConfig
    dataset: DatasetConfig
    include_global: bool
    max_pending: int
    accuracy_window: int
    auto_rollback: bool  # an accuracy drop soon after a promotion rolls the promotion back
    auto_rollback_window_s: float
    redactor: Redactor  # personal data out of examples before they are stored
    active: ActiveLearningSettings = ActiveLearningSettings()  # labelling tasks (streams/active.py)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides) -> ProcessorConfig:
        s = settings or defaults()
        config = cls(
            curation=s.streams.curation,
            triggers=TriggerConfig.from_settings(s),
            dataset=DatasetConfig.from_settings(s),
            include_global=s.streams.dataset.include_global,
            max_pending=s.streams.dataset.max_pending,
            accuracy_window=s.streams.triggers.accuracy_window,
            auto_rollback=s.validation.auto_rollback,
            auto_rollback_window_s=s.validation.auto_rollback_window_s,
            redactor=Redactor.from_settings(s),
            active=s.active_learning,
        )
        return replace(config, **overrides)


# What the processor gives the worker to send.
Output = TrainingRequest | RollbackCommand | LifecycleEvent | ReviewRequest


def _skipped(user_id: str, command_id: str, reason: str) -> LifecycleEvent:
    """The answer to a retrain command the worker will not carry out (same id on redelivery)."""
    return LifecycleEvent(
        event_id=f"skip-{hashlib.sha256(command_id.encode()).hexdigest()[:32]}",
        type="training_skipped",
        user_id=user_id,
        job_id=command_id,
        reason=reason,
    )


@dataclass
class BatchStats:
    events: int = 0
    duplicates: int = 0
    examples: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    redacted: dict[str, int] = field(default_factory=dict)  # placeholder type -> items replaced
    not_trained: int = 0  # events counted but not trained on (consent)
    forgotten: int = 0  # envelopes of a forgotten user from before the forget (ignored)
    tasks: dict[str, int] = field(default_factory=dict)  # labelling tasks by status: open (emitted), answered, expired


class UserProcessor:
    def __init__(self, cfg: ProcessorConfig, store: ArtifactStore) -> None:
        self.cfg = cfg
        self.store = store
        self.run_id = uuid.uuid4().hex  # this worker run, in the states it writes (see _repair_after_crash)

    # ---- events, commands, lifecycle ------------------------------------- #

    def handle(
        self, user_id: str, state: UserState, user_log: UserLog, envelopes: list[Envelope], stats: BatchStats
    ) -> list[Output]:
        """Apply a batch of one user's envelopes to `state`; return the training requests, commands and events to emit."""
        requests: list[Output] = []
        global_examples: list[TrainingExample] = []
        closed: list[Closed] = []
        now = state.last_event_at
        foreign = state.written_by != self.run_id
        requests.extend(self._repair_after_crash(state, user_log, now))
        for env in envelopes:
            if env.k == "event":
                event = env.event()
                at = event.timestamp.timestamp()
                now = max(now, at)
                curated = curate(event, env.prov, self.cfg.curation)
                trainable = state.training_consent and event.consent != "no-train"
                if trainable:
                    curated, found = redact_curated(curated, self.cfg.redactor)
                else:
                    curated, found = without_training(curated), {}
                fresh = apply_event(
                    state,
                    user_log,
                    event.event_id,
                    at,
                    curated,
                    self.cfg.curation,
                    max_pending=self.cfg.max_pending,
                    accuracy_window=self.cfg.accuracy_window,
                )
                if fresh and trainable and self.cfg.active.enabled:
                    closed += note(state.unresolved, curated, at, self.cfg.active)
                if fresh:
                    stats.events += 1
                    stats.not_trained += not trainable
                    for kind, n in found.items():
                        stats.redacted[kind] = stats.redacted.get(kind, 0) + n
                    for example in curated.examples:
                        stats.examples[example.source] = stats.examples.get(example.source, 0) + 1
                    if curated.to_global:
                        global_examples.extend(curated.examples)
                else:
                    stats.duplicates += 1
            elif env.k == "command":
                requests.extend(self._on_command(user_id, state, user_log, env.body, env.at or state.last_event_at))
            elif env.k == "lifecycle":
                requests.extend(self._on_lifecycle(user_id, state, user_log, env.body))
            if user_id != GLOBAL_USER:
                # After every envelope, not once per batch: a request then snapshots
                # exactly the examples up to the event that crossed the threshold, so
                # its dataset (and request_id) never depends on where a batch ended.
                # A batch replayed after a crash, or `adaptloop replay`, rebuilds the
                # very same request instead of a second, different one.
                requests.extend(self._after_envelope(user_id, state, user_log, now))
        if user_id != GLOBAL_USER and self.cfg.active.enabled:
            requests.extend(self._tasks(user_id, state, now, closed, resend=foreign))
        if global_examples:
            write_global(self.store, global_examples)
        if user_id == GLOBAL_USER:
            clear_pending(state, user_log)  # the global pool lives in the store, not in a user's dataset
        for r in requests:
            if isinstance(r, TrainingRequest):
                stats.requests[r.trigger] = stats.requests.get(r.trigger, 0) + 1
            elif isinstance(r, RollbackCommand):
                stats.requests["auto-rollback"] = stats.requests.get("auto-rollback", 0) + 1
            elif isinstance(r, ReviewRequest):
                stats.tasks[r.status] = stats.tasks.get(r.status, 0) + 1
        return requests

    def _tasks(self, user_id: str, state: UserState, now: float, closed: list[Closed], resend: bool) -> list[ReviewRequest]:
        """The user's labelling tasks that ended, and new ones for the questions worth most (streams/active.py).

        `resend`: another run wrote the state last (it may have crashed
        before its tasks went out): the open ones are sent again, same IDs."""
        if not state.unresolved and not closed:
            return []  # most users: nothing waits for an answer
        cfg = self.cfg.active
        open_before = [e for e in state.unresolved if e.task_id is not None] if resend else []
        closed = closed + expire(state.unresolved, now)
        budget = Budget(state.tasks_day, state.tasks_used)
        opened = open_tasks(user_id, state.unresolved, budget, now, cfg) if state.training_consent else []
        state.tasks_day, state.tasks_used = budget.day, budget.used
        return [
            *(as_message(user_id, c.entry, c.status, c.at, cfg) for c in closed),
            *(as_message(user_id, e, "open", now, cfg) for e in open_before + opened if e.task_id is not None),
        ]

    def _repair_after_crash(self, state: UserState, user_log: UserLog, now: float) -> list[TrainingRequest]:
        """Resend what a crash may have lost after the state landed; start this write's list of counted ids.

        The worker sends a batch's state before its event-id marks and its
        training request (streams.app's send phases), so a crash between the
        two leaves a state that counted events whose marks are missing (those
        events come again) and maybe a request that was never sent. The state
        lists the ids its last write counted; if another run wrote it
        (perhaps one that crashed), their marks are written again before
        anything else and kept until this run has written a state of its own,
        and a request that write opened is sent again (same request_id: the
        trainer trains it once). If this run wrote it, that batch's sends go
        out before this one's (they may still wait for the broker while this
        batch is worked out: streams/sending.py chains them), and a send that
        fails ends the run, so nothing between them is lost.
        """
        foreign = state.written_by != self.run_id
        carried = state.batch_ids if foreign else []
        for event_id in carried:
            user_log.mark_seen(event_id, now)
        resend = []
        if foreign and state.request_unsent and state.open_request is not None and state.open_request.message:
            resend.append(TrainingRequest.model_validate_json(state.open_request.message))
        state.batch_ids, state.written_by, state.request_unsent = list(carried), self.run_id, False
        return resend

    def _after_envelope(self, user_id: str, state: UserState, user_log: UserLog, now: float) -> list[Output]:
        """Windows pruned, a stale open request expired, then an automatic rollback or training request, if due."""
        prune_gaps(state, now, self.cfg.triggers.gap_window_s, keep=self.cfg.triggers.min_gap_events)
        self._expire_open_request(state, now)
        rollback = self._auto_rollback(user_id, state, now)
        if rollback is not None:
            return [rollback]
        trigger = automatic_trigger(state, now, self.cfg.triggers) if state.training_consent else None
        if trigger is None:
            return []
        return [self._snapshot(user_id, state, user_log, trigger, now, self.cfg.include_global)]

    def _auto_rollback(self, user_id: str, state: UserState, now: float) -> RollbackCommand | None:
        """A rollback command when the satisfaction rate drops below the floor soon after a promotion.

        Outcomes are counted from the promotion on, so the rate judges the new
        version. One rollback per promotion; the dip then needs no retraining request.
        """
        t = self.cfg.triggers
        if not self.cfg.auto_rollback or state.promoted_at is None or state.promoted_version is None:
            return None
        if now - state.promoted_at > self.cfg.auto_rollback_window_s:
            state.promoted_at = state.promoted_version = None  # it has proven itself
            return None
        rate = accuracy(state)
        if not t.accuracy_drop or rate is None or len(state.outcomes) < t.accuracy_min_samples or rate >= t.accuracy_floor:
            return None
        version = state.promoted_version
        state.promoted_at = state.promoted_version = None
        state.accuracy_alarm = True  # this dip is answered by the rollback
        log.warning("%s: satisfaction %.2f after v%d was promoted; rolling back", user_id, rate, version)
        return RollbackCommand(
            command_id=f"auto-rollback-{hashlib.sha256(f'{user_id}/{version}'.encode()).hexdigest()[:24]}",
            user_id=user_id,
            requested_by="streams",
            reason=f"accuracy dropped to {rate:.2f} (floor {t.accuracy_floor}) after v{version} was promoted",
        )

    def on_tick(self, user_id: str, state: UserState, user_log: UserLog, at: float, stats: BatchStats) -> list[TrainingRequest]:
        """The nightly schedule's tick for one user."""
        if user_id == GLOBAL_USER or not state.training_consent or nightly_trigger(state, self.cfg.triggers) is None:
            return []
        stats.requests["nightly"] = stats.requests.get("nightly", 0) + 1
        return [self._snapshot(user_id, state, user_log, "nightly", at, self.cfg.include_global)]

    def _on_command(self, user_id: str, state: UserState, user_log: UserLog, body: dict[str, Any], at: float) -> list[Output]:
        if body.get("type") == "consent":
            return self._on_consent(user_id, state, user_log, bool(body.get("train")))
        if body.get("type") != "retrain":
            return []  # validate and rollback are the trainer's
        command_id = str(body["command_id"])
        if not state.training_consent:
            return [_skipped(user_id, command_id, "the user has opted out of training")]
        include_global = bool(body.get("include_global", False))
        if state.open_request is not None:
            if state.open_request.command_id != command_id:
                state.deferred = DeferredCommand(command_id=command_id, include_global=include_global, at=at)
            return []
        return [self._snapshot(user_id, state, user_log, "on-demand", at, include_global, command_id=command_id)]

    def _on_lifecycle(self, user_id: str, state: UserState, user_log: UserLog, body: dict[str, Any]) -> list[TrainingRequest]:
        if body.get("type") == "promoted" and body.get("version"):
            # Judge the new version by what happens from now on.
            state.promoted_version, state.promoted_at = int(body["version"]), _timestamp(body, state.last_event_at)
            state.outcomes, state.accuracy_alarm = [], False
            missed = (body.get("details") or {}).get("missed_cases") or []
            if self.cfg.active.enabled and state.training_consent and isinstance(missed, list):
                note_missed_cases(state.unresolved, [str(p) for p in missed][:20], state.promoted_at, self.cfg.active)
        elif body.get("type") == "rolled_back":
            state.promoted_version = state.promoted_at = None
        open_ = state.open_request
        if open_ is None or body.get("request_id") != open_.request_id or body.get("type") not in ENDS_REQUEST:
            return []
        state.open_request = None
        if body.get("type") == "training_failed" and open_.dataset_uri and state.training_consent:
            # Nothing is lost: the failed dataset's new examples go back to pending.
            try:
                back = [e for e in read_examples(self.store, open_.dataset_uri) if e.source not in ("replay", "global")]
                add_pending(state, user_log, back, self.cfg.max_pending)
            except Exception as exc:  # the dataset file itself is gone: say so, keep going
                log.warning("could not restore the examples of failed request %s: %s", open_.request_id, exc)
        if state.deferred is not None:
            deferred, state.deferred = state.deferred, None
            return [
                self._snapshot(
                    user_id, state, user_log, "on-demand", deferred.at, deferred.include_global, command_id=deferred.command_id
                )
            ]
        return []

    def _on_consent(self, user_id: str, state: UserState, user_log: UserLog, train: bool) -> list[Output]:
        """Opting out drops the pending examples and a deferred retrain; opting in counts from here on."""
        if train or not state.training_consent:
            state.training_consent = train
            return []
        state.training_consent = False
        clear_pending(state, user_log)
        state.gaps = []
        log.info("%s opted out of training", user_id)
        deferred, state.deferred = state.deferred, None
        return [] if deferred is None else [_skipped(user_id, deferred.command_id, "the user has opted out of training")]

    def _expire_open_request(self, state: UserState, now: float) -> None:
        """Forget a request nobody answered within the timeout; the next trigger starts anew."""
        open_ = state.open_request
        if open_ is None or now - open_.at < self.cfg.triggers.open_request_timeout_s:
            return
        log.warning("request %s unanswered for %.0fs; closing it", open_.request_id, now - open_.at)
        state.open_request = None

    # ---- snapshot --------------------------------------------------------- #

    def dataset_for(
        self, user_id: str, state: UserState, user_log: UserLog, include_global: bool
    ) -> tuple[list[TrainingExample], list[TrainingExample], list[OffsetRange]]:
        """(train, test, lineage) of the user's dataset as of now: pending examples, a replay sample, the global pool."""
        replay_pool: list[TrainingExample] = []
        if state.last_dataset_uri:
            try:
                replay_pool = read_examples(self.store, state.last_dataset_uri)
            except Exception as exc:  # an unreadable earlier dataset costs this run its replay, nothing more
                log.warning("replay pool %s unreadable, snapshotting without it: %s", state.last_dataset_uri, exc)
        global_pool = read_global(self.store) if include_global else []
        pending = pending_examples(state, user_log)
        curation = self.cfg.curation
        new = dedupe(augment(pending, curation.paraphrases, curation.seed, curation.rewordings))
        train, test = build_dataset(
            new,
            replay_pool=replay_pool,
            global_pool=global_pool,
            include_global=include_global,
            cfg=self.cfg.dataset,
            user_id=user_id,
        )
        return train, test, lineage(pending)

    def _snapshot(
        self,
        user_id: str,
        state: UserState,
        user_log: UserLog,
        trigger: str,
        now: float,
        include_global: bool,
        command_id: str | None = None,
    ) -> TrainingRequest:
        train, test, ranges = self.dataset_for(user_id, state, user_log, include_global)
        ref = write_dataset(self.store, user_id, train, test, trigger=trigger, lineage_ranges=ranges)
        request = TrainingRequest(
            request_id=request_id_for(user_id, ref.sha256, trigger if command_id is None else f"{trigger}:{command_id}"),
            user_id=user_id,
            trigger=trigger,
            dataset=ref,
            lineage=ranges,
            include_global=include_global,
            command_id=command_id,
        )
        state.open_request = OpenRequest(
            request_id=request.request_id,
            at=now,
            trigger=trigger,
            command_id=command_id,
            include_global=include_global,
            dataset_uri=ref.uri,
            message=request.model_dump_json(exclude_none=True),
        )
        state.request_unsent = True
        clear_pending(state, user_log)
        state.gaps = []
        state.last_request_at = now
        state.requests_total += 1
        state.last_dataset_uri = ref.uri
        return request
