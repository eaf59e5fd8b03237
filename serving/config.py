"""The serving config, built from the settings once, at the edge (`ServeConfig.from_settings`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from core.kafka.client import ClientConfig
from core.settings import EncryptionSettings, Settings, defaults, tokens_file


@dataclass(frozen=True)
class ServeConfig:
    client: ClientConfig
    lifecycle_topic: str
    feedback_topic: str
    conversations_topic: str
    storage_root: str
    max_versions: int
    tokens_file: Path
    max_body_bytes: int
    max_resident_adapters: int
    max_batch_size: int
    batch_window_s: float
    max_tokens: int
    default_max_tokens: int
    feedback_window: int
    publish_conversations: bool
    on_bad_adapter: str  # "base" | "error"
    encryption: EncryptionSettings = EncryptionSettings()  # storage.encryption: seal personal files

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides) -> ServeConfig:
        s = settings or defaults()
        v = s.serving
        config = cls(
            client=ClientConfig.from_settings(s),
            lifecycle_topic=s.topics.lifecycle.name,
            feedback_topic=s.topics.feedback.name,
            conversations_topic=s.topics.conversations.name,
            storage_root=s.storage_root,
            encryption=s.storage.encryption,
            max_versions=s.max_adapter_versions,
            tokens_file=tokens_file(s),
            max_body_bytes=s.api.max_body_bytes,
            max_resident_adapters=v.max_resident_adapters,
            max_batch_size=v.max_batch_size,
            batch_window_s=v.batch_window_ms / 1000,
            max_tokens=v.max_tokens,
            default_max_tokens=v.default_max_tokens,
            feedback_window=v.feedback_window,
            publish_conversations=v.publish_conversations,
            on_bad_adapter=v.on_bad_adapter,
        )
        return replace(config, **overrides)
