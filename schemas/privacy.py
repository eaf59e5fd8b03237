"""Records on `adapter.forgotten` (compacted, keyed by the salted hash): who was forgotten, and when.

The id itself is never written: `user_hash` is `core.forgotten.UserHasher`'s
salted hash. Read whole at start-up by `adaptloop replay` (and by anyone who
must honour a forget on data adaptloop does not own): events of a forgotten
user stamped at or before `forgotten_at` are ignored.
"""

from __future__ import annotations

from pydantic import Field

from schemas.common import Message, Text, Timestamp

USER_HASH_PATTERN = r"^[0-9a-f]{32}$"

# The worker's forget markers in its changelogs are keyed FORGOTTEN_PREFIX +
# partition + salted hash (streams/tables.py): readers of those changelogs
# (the API's status views) skip them by this prefix. No user_id starts so.
FORGOTTEN_PREFIX = b"\x00forgotten\x00"


class ForgottenRecord(Message):
    user_hash: str = Field(pattern=USER_HASH_PATTERN)
    forgotten_at: Timestamp
    reason: Text | None = None
