"""Which model answers a request: the base model, a user's active version, or a version named explicitly.

    route = router.route(model="alice@v3" | "alice" | <base name>, user="alice" | None, who=principal)

OpenAI's `user` field names the end user: the request is answered with that
user's active version (read from the registry at every request, so a
promotion or rollback, announced or made offline, counts from the next
request on). `model` may name an adapter as vLLM does: `<user_id>` (that
user's active version) or `<user_id>@v<N>` (a kept version); the base model's
name means the base model. A user-scoped token is answered only as its user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.errors import AdaptloopError, VersionNotFound
from schemas.common import check_user_id
from serving.adapters import adapter_name
from trainer.registry import AdapterRegistry

_VERSIONED = re.compile(r"^(?P<user>.+)@v(?P<version>[1-9][0-9]{0,8})$")


class RouteError(AdaptloopError):
    """A request names something that cannot answer it; `status` is the HTTP status to give."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Route:
    user_id: str | None  # whose request (None: nobody's: the base model, not feedback-able)
    version: int | None  # the adapter version that answers; None: the base model
    model: str  # the name the answer carries: the base model's, or `<user>@v<N>`
    fingerprint: str = ""  # filled by the server once the adapter's hash is known

    @property
    def adapter(self) -> str | None:
        return None if self.version is None else adapter_name(self.user_id or "", self.version)


class Router:
    def __init__(self, registry: AdapterRegistry, base_name: str, base_sha256: str, on_bad_adapter: str = "base") -> None:
        self.registry, self.base_name, self.on_bad_adapter = registry, base_name, on_bad_adapter
        self.base_fingerprint = f"adaptloop:base:{(base_sha256 or 'unknown')[:12]}"
        self.refused = 0  # versions that failed their check and were not served

    def route(self, model: str, user: str | None, who) -> Route:
        named_user, version = self.parse_model(model)
        if named_user is not None and user is not None and named_user != user:
            raise RouteError(422, f"model {model!r} names user {named_user!r} but the request's user is {user!r}")
        user_id = named_user or user
        if user_id is not None and not who.may_act_for(user_id):
            raise RouteError(403, f"this token may not be answered as user {user_id!r}")
        if user_id is None:
            return Route(None, None, self.base_name, self.base_fingerprint)
        if version is None:
            return self._active(user_id)
        try:
            self.registry.info(user_id, version)
        except VersionNotFound:
            raise RouteError(404, f"{user_id} has no kept version {version}") from None
        return Route(user_id, version, adapter_name(user_id, version))

    def parse_model(self, model: str) -> tuple[str | None, int | None]:
        if model == self.base_name:
            return None, None
        match = _VERSIONED.match(model)
        user, version = (match["user"], int(match["version"])) if match else (model, None)
        try:
            check_user_id(user)
        except ValueError:
            raise RouteError(
                404, f"no model {model!r}: name the base model ({self.base_name}), <user_id> or <user_id>@v<N>"
            ) from None
        return user, version

    def _active(self, user_id: str) -> Route:
        active = self.registry.active(user_id)
        if active is None:
            return Route(user_id, None, self.base_name, self.base_fingerprint)
        return Route(user_id, active, adapter_name(user_id, active))

    def fallback(self, route: Route, problem: Exception) -> Route:
        """A route whose adapter failed its check (tampered, missing): the base model, or a 503, by config."""
        self.refused += 1
        if self.on_bad_adapter == "error":
            raise RouteError(503, f"{route.model} cannot be served: {problem}") from None
        return Route(route.user_id, None, self.base_name, self.base_fingerprint)
