"""The worker's internal message: one per valid input, keyed by user_id.

A source message (an input event, a retrain command, a lifecycle event) is
validated once and becomes an `Envelope`; one that sits in another
partition than its user's goes over the internal topic `<app_id>-users` as
JSON. The nightly schedule's ticks travel the same way.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from schemas.events import EVENT_TYPE_BY_INPUT_KIND
from schemas.training import Provenance


class Envelope(BaseModel):
    k: Literal["event", "command", "lifecycle", "tick"]
    kind: str | None = None  # the input kind of an event
    body: dict[str, Any] = Field(default_factory=dict)  # a factory: a literal default is deep-copied per envelope
    prov: Provenance | None = None
    at: float | None = None  # tick time
    parsed: Any = Field(None, exclude=True)  # the validated event, when it never left this process

    def to_wire(self) -> bytes:
        if self.parsed is not None and not self.body:
            return (
                self.model_copy(update={"body": self.parsed.model_dump(mode="json")}).model_dump_json(exclude_none=True).encode()
            )
        return self.model_dump_json(exclude_none=True).encode()

    def event(self):
        """The validated input event (parsed again only when it came over the internal topic)."""
        return self.parsed if self.parsed is not None else EVENT_TYPE_BY_INPUT_KIND[self.kind or ""].model_validate(self.body)
