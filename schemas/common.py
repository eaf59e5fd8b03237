"""Field types shared by every message: ids, bounded text, timestamps, ratings.

The rules, stated once:
- Unknown fields are rejected (`extra="forbid"`): a misspelt optional field
  such as `resolutoin` would otherwise be dropped without a word. A producer
  that adds a field bumps `schema_version` together with adaptloop.
- Text is bounded (`MAX_TEXT_CHARS`) and may not hold control characters other
  than tab, newline and carriage return.
- `user_id` matches `USER_ID_PATTERN` (ASCII letters, digits, `-`, `_`, `.`,
  `@`; 1-128 chars), is not `.`-only and holds no `..`: it becomes part of file
  paths, so nothing it can say leaves the storage root.
- Timestamps are ISO-8601; one without a UTC offset is read as UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

SCHEMA_VERSION = 1

MAX_TEXT_CHARS = 4000
MAX_SHORT_CHARS = 200
USER_ID_PATTERN = r"^[A-Za-z0-9@_.\-]{1,128}$"
EVENT_ID_PATTERN = r"^[A-Za-z0-9@_.:\-]{1,128}$"

_USER_ID = re.compile(USER_ID_PATTERN)


class Message(BaseModel):
    """Base of every message on every topic: frozen, strict about unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)

    def to_bytes(self) -> bytes:
        """The wire form: compact UTF-8 JSON."""
        return self.model_dump_json(exclude_none=True).encode("utf-8")


def check_user_id(value: str) -> str:
    """Return `value` if it is a safe user_id, else raise ValueError saying why."""
    if not isinstance(value, str):
        raise ValueError("user_id must be a string")
    if not _USER_ID.match(value):
        raise ValueError(
            "user_id must be 1-128 ASCII letters, digits, '-', '_', '.' or '@' (no spaces, slashes or control characters)"
        )
    if ".." in value or not value.strip("."):
        raise ValueError("user_id must not contain '..' or consist of dots only")
    return value


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UserId = Annotated[str, AfterValidator(check_user_id), Field(examples=["alice", "user-42@example.com"])]
EventId = Annotated[str, StringConstraints(pattern=EVENT_ID_PATTERN)]
# The control-character rule is a pattern, checked in pydantic-core (Rust): a
# Python validator per text field cost more than the rest of validation.
_NO_CONTROL = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS, pattern=_NO_CONTROL)]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SHORT_CHARS, pattern=_NO_CONTROL)]
Timestamp = Annotated[datetime, AfterValidator(_as_utc)]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


def utc_now() -> datetime:
    return datetime.now(UTC)


def normalise_rating(rating: float, scale: str | None) -> float:
    """Map a rating to -1..1.

    Two scales are accepted: `unit` (-1..1, thumbs down..up) and `stars` (1..5).
    Without an explicit `rating_scale`, a value in [-1, 1] is read on the unit
    scale and a value in (1, 5] as stars; so `1` means thumbs-up, and a one-star
    rating must say `rating_scale: "stars"`.
    """
    if scale is None:
        scale = "unit" if -1.0 <= rating <= 1.0 else "stars"
    if scale == "unit":
        if not -1.0 <= rating <= 1.0:
            raise ValueError(f"rating {rating} is outside the unit scale -1..1")
        return float(rating)
    if not 1.0 <= rating <= 5.0:
        raise ValueError(f"rating {rating} is outside the stars scale 1..5")
    return (float(rating) - 3.0) / 2.0


def model_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON Schema that producers in other languages validate against."""
    schema = model.model_json_schema(mode="validation")
    schema.setdefault("$schema", "https://json-schema.org/draft/2020-12/schema")
    return schema
