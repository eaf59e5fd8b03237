"""Dead letters on `adapter.dlq`: a message that could not be used, and why.

A letter names the original's source topic, partition and offset (where the
whole original stays, for operators who may read that topic), its size and
sha256, the reason, and a readable `preview` of its start with personal data
replaced by placeholders (core/redaction.py). The raw bytes themselves
(base64, up to `MAX_KEPT_BYTES`) travel only when `privacy.dlq_raw` is on;
a larger original (junk up to the broker's 1 MB limit) is cut there, so the
letter always fits on the topic, and `value_truncated` says so.
"""

from __future__ import annotations

import base64
import hashlib

from pydantic import Field

from core.redaction import Redactor
from schemas.common import Message, Timestamp, utc_now

MAX_KEPT_BYTES = 256 * 1024  # base64 makes it ~342 KiB: far below the broker's 1 MB message limit
MAX_KEPT_KEY_BYTES = 1024
PREVIEW_CHARS = 2000


class DeadLetter(Message):
    source_topic: str
    partition: int = Field(ge=-1)
    offset: int = Field(ge=-1)
    key_b64: str | None = Field(None, description="the original key, base64 (its first 1 KiB)")
    value_b64: str | None = Field(
        None, description="the original value bytes, base64 (the first MAX_KEPT_BYTES of them); only with privacy.dlq_raw"
    )
    preview: str = Field("", description="the original's start as text, personal data replaced by placeholders")
    value_bytes: int = Field(0, ge=0, description="the original value's size")
    value_sha256: str = Field("", description="sha256 of the whole original value")
    value_truncated: bool = Field(False, description="value_b64 (when kept) holds only the start of the original")
    reason: str = Field(min_length=1, max_length=2000)
    received_at: Timestamp = Field(default_factory=utc_now)

    @classmethod
    def of(
        cls,
        *,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        reason: str,
        redactor: Redactor,
        keep_raw: bool,
    ) -> DeadLetter:
        """A letter for `value`; `redactor` cleans the preview and the reason (which may quote the input)."""
        value = value or b""
        preview = value[: PREVIEW_CHARS * 4].decode("utf-8", errors="replace")[:PREVIEW_CHARS]
        return cls(
            source_topic=topic,
            partition=partition,
            offset=offset,
            key_b64=None if key is None else base64.b64encode(key[:MAX_KEPT_KEY_BYTES]).decode("ascii"),
            value_b64=base64.b64encode(value[:MAX_KEPT_BYTES]).decode("ascii") if keep_raw else None,
            preview=redactor.clean(preview),
            value_bytes=len(value),
            value_sha256=hashlib.sha256(value).hexdigest(),
            value_truncated=len(value) > MAX_KEPT_BYTES,
            reason=redactor.clean(reason)[:2000],
        )

    def original_value(self) -> bytes | None:
        """The original bytes (only their start when `value_truncated`); None when the letter kept none."""
        return None if self.value_b64 is None else base64.b64decode(self.value_b64)
