"""Dead letters on `adapter.dlq`: a message that could not be used, and why."""

from __future__ import annotations

import base64

from pydantic import Field

from schemas.common import Message, Timestamp, utc_now


class DeadLetter(Message):
    source_topic: str
    partition: int = Field(ge=-1)
    offset: int = Field(ge=-1)
    key_b64: str | None = Field(None, description="the original key, base64")
    value_b64: str = Field(description="the original value bytes, base64")
    reason: str = Field(min_length=1, max_length=2000)
    received_at: Timestamp = Field(default_factory=utc_now)

    @classmethod
    def of(cls, *, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, reason: str) -> "DeadLetter":
        return cls(
            source_topic=topic,
            partition=partition,
            offset=offset,
            key_b64=None if key is None else base64.b64encode(key).decode("ascii"),
            value_b64=base64.b64encode(value or b"").decode("ascii"),
            reason=reason[:2000],
        )

    def original_value(self) -> bytes:
        return base64.b64decode(self.value_b64)
