"""Forget a user everywhere adaptloop keeps them (GDPR art. 17).

    cfg = ForgetConfig.from_settings(settings)
    result = forget_user(cfg, "ana", reason="erasure request #1234")

In this order, each step idempotent, so a forget killed at any point
finishes when run again (with the first run's forget time, from its marker):

1. the marker `privacy/forgotten/<hash>.json` ("started"): from now on a
   trainer drops any version of the user whose request is older;
2. a `ForgottenRecord` on `adapter.forgotten` (compacted, keyed by the
   salted hash): `adaptloop replay` and anyone else reading the input topics
   ignore the user's events up to the forget time;
3. a `ForgetCommand` to the worker that owns the user: it drops the user's
   state, dedupe marks and pending examples, keeps a marker under the hash
   and purges its changelog partitions (streams/tables.py, streams/purge.py);
4. the store: datasets, held-out splits and manifests, the latest training
   split, the user's test cases, every adapter version and archived version,
   checkpoints, the index entry; the audit, validation and rollback logs keep
   one tombstone line (hash, time, reason) instead of the user's lines;
5. a `forgotten` lifecycle event (its `user_id` is the hash): `serve`
   drops what it holds of the user;
6. the marker says "done".

The global pool holds only the `global` pseudo-user's examples, so no
user's text is in it. Events still on the input topics belong to the
services that wrote them; adaptloop's own event topics (requests,
lifecycle, commands, dead letters) keep the id until their retention.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pydantic import BaseModel, TypeAdapter, ValidationError

from core.encryption import key_file, open_store
from core.errors import AdaptloopError
from core.forgotten import ForgetMarker, ForgetMarkers, UserHasher
from core.kafka.client import ClientConfig
from core.kafka.io import produce
from core.kafka.topics import TopicPlan, ensure_topics, plans_from_specs
from core.settings import EncryptionSettings, Settings
from core.storage import ArtifactStore
from schemas import ForgetCommand, ForgottenRecord, LifecycleEvent, check_user_id
from schemas.common import Text
from streams.dataset import latest_split_file, user_versions_dir
from trainer.job import user_tests_file
from trainer.registry import REGISTRY_DIR, AdapterRegistry, user_checkpoints

_REASON: TypeAdapter = TypeAdapter(Text)  # it goes into events and tombstones: their text rules


@dataclass(frozen=True)
class ForgetConfig:
    storage_root: str
    user_tests_dir: str
    client: ClientConfig
    commands_topic: str
    lifecycle_topic: str
    forgotten: TopicPlan  # `topics.forgotten`: forget creates it when it is missing
    encryption: EncryptionSettings = EncryptionSettings()  # storage.encryption: seal personal files

    @classmethod
    def from_settings(cls, settings: Settings) -> ForgetConfig:
        t = settings.topics
        return cls(
            storage_root=settings.storage_root,
            encryption=settings.storage.encryption,
            user_tests_dir=settings.validation.user_tests_dir,
            client=ClientConfig.from_settings(settings),
            commands_topic=t.commands.name,
            lifecycle_topic=t.lifecycle.name,
            forgotten=plans_from_specs([t.forgotten])[0],
        )


class ForgetResult(BaseModel):
    user_hash: str
    forgotten_at: str
    resumed: bool  # an interrupted forget of the user was finished
    removed: list[str]  # what the store held, by relative path
    command_id: str  # the worker's ForgetCommand (also the lifecycle event's job_id)


def forget_user(cfg: ForgetConfig, user_id: str, reason: str, requested_by: str = "cli") -> ForgetResult:
    """Erase `user_id` from the store and the worker; see the module docstring for the steps."""
    check_user_id(user_id)
    try:
        reason = _REASON.validate_python(reason)
    except ValidationError as exc:
        raise AdaptloopError(f"reason: {exc.errors()[0]['msg']}") from None
    store = open_store(cfg.storage_root, cfg.encryption)
    user_hash = UserHasher.for_store(store)(user_id)
    markers = ForgetMarkers(store)
    marker = markers.read(user_hash)
    resumed = marker is not None and marker.state == "started"
    if not resumed:
        marker = ForgetMarker(user_hash=user_hash, at=time.time(), reason=reason)
        markers.write(marker)
    assert marker is not None
    at = marker.when
    command_id = f"forget-{user_hash[:16]}-{int(marker.at * 1000)}"
    _announce_forgotten(cfg, marker)
    command = ForgetCommand(
        command_id=command_id, user_id=user_id, user_hash=user_hash, requested_at=at, requested_by=requested_by
    )
    produce(cfg.client, cfg.commands_topic, [(user_id, command.to_bytes())])
    removed = _remove_from_store(cfg, store, user_id, marker)
    event = LifecycleEvent(
        event_id=command_id,
        type="forgotten",
        user_id=user_hash,
        job_id=command_id,
        timestamp=at,
        reason=marker.reason,
        details={"user_hash": user_hash},
    )
    produce(cfg.client, cfg.lifecycle_topic, [(user_hash, event.to_bytes())])
    markers.write(marker.model_copy(update={"state": "done"}))
    return ForgetResult(user_hash=user_hash, forgotten_at=at.isoformat(), resumed=resumed, removed=removed, command_id=command_id)


def _announce_forgotten(cfg: ForgetConfig, marker: ForgetMarker) -> None:
    ensure_topics(cfg.client, [cfg.forgotten])
    record = ForgottenRecord(user_hash=marker.user_hash, forgotten_at=marker.when, reason=marker.reason)
    produce(cfg.client, cfg.forgotten.name, [(marker.user_hash, record.to_bytes())])


def _remove_from_store(cfg: ForgetConfig, store: ArtifactStore, user_id: str, marker: ForgetMarker) -> list[str]:
    files = [
        key_file(marker.user_hash),  # first: every sealed copy of their files, backups too, is unreadable from here on
        user_versions_dir(user_id),
        latest_split_file(user_id),
        user_tests_file(cfg.user_tests_dir, user_id),
        user_checkpoints(marker.user_hash),
    ]
    removed = [relative for relative in files if store.remove(relative)]
    if store.sealer is not None:
        store.sealer.forget(marker.user_hash)
    at = marker.when.isoformat()
    registry = AdapterRegistry(cfg.storage_root)
    removed += [f"{REGISTRY_DIR}/{path}" for path in registry.forget(user_id, marker.user_hash, at, marker.reason)]
    return removed
