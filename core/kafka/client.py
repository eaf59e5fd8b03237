"""Kafka client configuration, derived from the settings at the client's edge.

`ClientConfig` is the plain, settings-free description every component takes;
`librdkafka()` turns it into a confluent-kafka dict (`librdkafka_producer()`
for a producer, its batches fitted to the topics' limits) and `aiokafka()`
into keyword arguments for aiokafka (which Faust uses). Secrets stay
`SecretStr` until this last step, so they never land in logs or reprs.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

if TYPE_CHECKING:  # the settings are read here only, at the edge; a ClientConfig never holds them
    from core.settings import Settings

RECORD_BATCH_OVERHEAD = 1024  # a record batch's header and its records' framing, beyond what a client counts


@dataclass(frozen=True)
class ClientConfig:
    bootstrap_servers: str
    client_id: str = "adaptloop"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = field(default=None, repr=False)
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    producer_batch_bytes: int | None = None  # a producer's largest record batch; None: the client's default

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientConfig:
        """Build from the settings' `kafka` section (the only place that reads it) and its `topics`: producers keep
        their record batches under the smallest topic's `max.message.bytes`."""
        kafka, limit = settings.kafka, settings.topics.record_batch_limit()
        return cls(
            bootstrap_servers=kafka.bootstrap_servers,
            client_id=kafka.client_id,
            security_protocol=kafka.security_protocol,
            sasl_mechanism=kafka.sasl_mechanism,
            sasl_username=kafka.sasl_username,
            sasl_password=kafka.sasl_password,
            ssl_cafile=kafka.ssl_cafile,
            ssl_certfile=kafka.ssl_certfile,
            ssl_keyfile=kafka.ssl_keyfile,
            producer_batch_bytes=max(1, limit - RECORD_BATCH_OVERHEAD) if limit is not None else None,
        )

    def librdkafka(self, **extra: Any) -> dict[str, Any]:
        """A confluent-kafka config dict; `extra` adds client-specific keys."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanisms"] = self.sasl_mechanism
            conf["sasl.username"] = self.sasl_username or ""
            conf["sasl.password"] = self.sasl_password.get_secret_value() if self.sasl_password else ""
        if self.ssl_cafile:
            conf["ssl.ca.location"] = str(self.ssl_cafile)
        if self.ssl_certfile:
            conf["ssl.certificate.location"] = str(self.ssl_certfile)
        if self.ssl_keyfile:
            conf["ssl.key.location"] = str(self.ssl_keyfile)
        conf.update(extra)
        return conf

    def librdkafka_producer(self, **extra: Any) -> dict[str, Any]:
        """A confluent-kafka producer's config: `librdkafka(**extra)` with its batches within `producer_batch_bytes`
        (librdkafka sends a topic one batch of up to 1,000,000 bytes otherwise, which a topic with a lower
        `max.message.bytes` refuses whole: librdkafka issue #1716)."""
        batch = {"batch.size": self.producer_batch_bytes} if self.producer_batch_bytes is not None else {}
        return self.librdkafka(**batch, **extra)

    def aiokafka(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka producers and consumers."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            context = ssl.create_default_context(cafile=str(self.ssl_cafile) if self.ssl_cafile else None)
            if self.ssl_certfile:
                context.load_cert_chain(str(self.ssl_certfile), str(self.ssl_keyfile) if self.ssl_keyfile else None)
            kwargs["ssl_context"] = context
        if self.sasl_mechanism:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        return kwargs
