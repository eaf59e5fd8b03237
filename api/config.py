"""The API's plain config, built from the settings once, at the edge (`ApiConfig.from_settings`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.kafka.client import ClientConfig
from core.settings import (
    EncryptionSettings,
    Settings,
    changelog_topic,
    tokens_file,
    trainer_commands_group,
    worker_internal_topic,
)
from privacy.export import ExportConfig
from privacy.forget import ForgetConfig


@dataclass(frozen=True)
class ApiConfig:
    client: ClientConfig
    commands_topic: str
    lifecycle_topic: str
    requests_topic: str | None  # training requests: each user's latest, for `status`
    users_changelog: str | None  # the worker's user table: each user's pending gaps
    storage_root: str
    max_versions: int
    tokens_file: Path
    max_body_bytes: int
    promote_if_score: float | None = None  # drawn on the dashboard's score chart
    promotion_mode: str = "auto"  # promotion.mode: a user's own mode wins
    review_requests_topic: str | None = None  # labelling tasks: each user's open ones
    review_timeout_h: float = 72.0
    review_on_timeout: str = "deny"
    lag_groups: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (consumer group, its topics) whose lag /metrics shows
    command_timeout_s: float = 15.0  # how long a command may wait for Kafka's acknowledgement before the caller gets a 503
    export: ExportConfig | None = None  # what a user's export reads
    forget: ForgetConfig | None = None  # where a user's forget erases
    encryption: EncryptionSettings = EncryptionSettings()  # storage.encryption: seal personal files

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiConfig:
        t = settings.topics
        worker_topics = (
            *[spec.name for spec in t.inputs().values()],
            t.commands.name,
            t.lifecycle.name,
            worker_internal_topic(settings.streams.app_id),
        )
        return cls(
            client=ClientConfig.from_settings(settings),
            commands_topic=t.commands.name,
            lifecycle_topic=t.lifecycle.name,
            requests_topic=t.training_requests.name,
            review_requests_topic=t.review_requests.name,
            users_changelog=changelog_topic(settings.streams.app_id, "users"),
            storage_root=settings.storage_root,
            encryption=settings.storage.encryption,
            max_versions=settings.max_adapter_versions,
            tokens_file=tokens_file(settings),
            max_body_bytes=settings.api.max_body_bytes,
            promote_if_score=settings.promote_if_score,
            promotion_mode=settings.promotion.mode,
            review_timeout_h=settings.review.timeout_h,
            review_on_timeout=settings.review.on_timeout,
            export=ExportConfig.from_settings(settings),
            forget=ForgetConfig.from_settings(settings),
            lag_groups=(
                (settings.streams.app_id, worker_topics),
                (settings.training.group_id, (t.training_requests.name,)),
                (trainer_commands_group(settings.training.group_id), (t.commands.name,)),
            ),
        )
