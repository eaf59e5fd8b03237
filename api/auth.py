"""Bearer tokens, stored hashed, each with scopes.

    adaptloop api token create --scope admin              # prints the token once
    adaptloop api token create --scope user:alice --scope user:bob
    adaptloop api token list
    adaptloop api token revoke TOKEN_ID

A token is `al_<id>_<secret>`; the store keeps the id, the sha256 of the
whole token and its scopes (a JSON file, mode 0600, replaced atomically).
Scope `admin` may act for every user; `user:<id>` for that user only;
`reviewer` may see and decide reviews (promotion.mode: review), nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from core.errors import ConfigError
from core.storage import atomic_write_json
from schemas.common import check_user_id

ADMIN = "admin"
REVIEWER = "reviewer"


def parse_scope(scope: str) -> str:
    """`admin`, `reviewer` or `user:<user_id>` (the user id checked with the shared pattern)."""
    if scope in (ADMIN, REVIEWER):
        return scope
    if scope.startswith("user:"):
        try:
            return "user:" + check_user_id(scope[5:])
        except ValueError as exc:
            raise ConfigError(f"scope {scope!r}: {exc}") from None
    raise ConfigError(f"scope {scope!r} is none of 'admin', 'reviewer' or 'user:<user_id>'")


@dataclass(frozen=True)
class Principal:
    token_id: str
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.scopes

    @property
    def may_review(self) -> bool:
        return self.is_admin or REVIEWER in self.scopes

    def may_act_for(self, user_id: str) -> bool:
        return self.is_admin or f"user:{user_id}" in self.scopes


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _load(self) -> dict[str, dict]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ConfigError(f"token store {self.path} is corrupt: {exc}") from None

    def _save(self, tokens: dict[str, dict]) -> None:
        atomic_write_json(self.path, tokens, mode=0o600)

    def create(self, scopes: list[str], note: str = "") -> tuple[str, str]:
        """A new token: (token_id, token). The token itself is never stored."""
        if not scopes:
            raise ConfigError("a token needs at least one scope: --scope admin or --scope user:<user_id>")
        parsed = sorted({parse_scope(s) for s in scopes})
        token_id = secrets.token_hex(4)
        token = f"al_{token_id}_{secrets.token_urlsafe(32)}"
        tokens = self._load()
        tokens[token_id] = {"sha256": _digest(token), "scopes": parsed, "note": note, "created_at": datetime.now(UTC).isoformat()}
        self._save(tokens)
        return token_id, token

    def revoke(self, token_id: str) -> bool:
        tokens = self._load()
        if tokens.pop(token_id, None) is None:
            return False
        self._save(tokens)
        return True

    def forget_user(self, user_id: str) -> int:
        """Drop the scope `user:<user_id>` everywhere (a token left with no scope is revoked); how many tokens changed."""
        scope = parse_scope(f"user:{user_id}")
        tokens = self._load()
        changed = [token_id for token_id, entry in tokens.items() if scope in entry.get("scopes", [])]
        for token_id in changed:
            tokens[token_id]["scopes"] = [s for s in tokens[token_id]["scopes"] if s != scope]
            if not tokens[token_id]["scopes"]:
                del tokens[token_id]
        if changed:
            self._save(tokens)
        return len(changed)

    def list(self) -> dict[str, dict]:
        return {k: {n: v for n, v in entry.items() if n != "sha256"} for k, entry in self._load().items()}

    def authenticate(self, token: str) -> Principal | None:
        """The token's principal, or None for an unknown, revoked or malformed token."""
        parts = token.split("_", 2)
        if len(parts) != 3 or parts[0] != "al":
            return None
        entry = self._load().get(parts[1])
        if entry is None or not hmac.compare_digest(entry["sha256"], _digest(token)):
            return None
        return Principal(parts[1], frozenset(entry["scopes"]))
