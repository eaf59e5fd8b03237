"""Turn raw message bytes into a validated model, or say exactly why not.

Agents and consumers call `decode()` on the raw value; every failure is an
`InvalidMessage` whose `reason` goes to the dead-letter topic as it is.
"""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from core.errors import InvalidMessage

M = TypeVar("M")


def explain(exc: ValidationError, limit: int = 5) -> str:
    """One line per problem: `field.path: message`, at most `limit` of them."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "(message)"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


def decode_json(raw: bytes | None, max_bytes: int) -> object:
    if raw is None:
        raise InvalidMessage("empty message (null value)")
    if len(raw) > max_bytes:
        raise InvalidMessage(f"too large: {len(raw)} bytes > {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"not UTF-8: {exc}") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise InvalidMessage("not JSON: nested too deeply") from None
    except ValueError as exc:
        raise InvalidMessage(f"not JSON: {exc}") from None


def decode(model: type[M] | TypeAdapter, raw: bytes | None, max_bytes: int = 64 * 1024) -> M:
    """Decode `raw` (UTF-8 JSON object) into `model`; raise InvalidMessage with the reason."""
    if raw is not None and len(raw) <= max_bytes:
        # pydantic parses and validates a good message in one pass (~2x json.loads
        # + validation); anything it refuses takes the path below, which names the reason.
        try:
            if isinstance(model, TypeAdapter):
                return model.validate_json(raw)
            assert issubclass(model, BaseModel)
            return model.model_validate_json(raw)
        except (ValidationError, RecursionError):
            pass
    return _decode_explained(model, raw, max_bytes)


def _decode_explained(model: type[M] | TypeAdapter, raw: bytes | None, max_bytes: int) -> M:
    data = decode_json(raw, max_bytes)
    if not isinstance(data, dict):
        raise InvalidMessage(f"not a JSON object: got {type(data).__name__}")
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_python(data)
        assert issubclass(model, BaseModel)
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidMessage(f"invalid: {explain(exc)}") from None
    except RecursionError:
        raise InvalidMessage("invalid: nested too deeply") from None
