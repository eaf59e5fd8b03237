"""Dependency providers: what a route gets from the app (the token's principal, the registry, the job tracker).

Routes declare what they need (`who: Auth`, `registry: Registry`); the app
puts the shared objects on `app.state` once, in `create_app`.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request

from api.auth import Principal
from api.config import ApiConfig
from api.jobs import JobTracker
from schemas.common import USER_ID_PATTERN, check_user_id
from trainer.registry import AdapterRegistry

UserIdPath = Annotated[str, Path(pattern=USER_ID_PATTERN, max_length=128, description="the user's id")]


def job_id() -> str:
    """A new command id: what a caller follows its job by (`GET /api/adapter/job/{job_id}`)."""
    return f"job-{uuid.uuid4().hex}"


def principal(request: Request) -> Principal:
    """The bearer token's principal; 401 for a missing, malformed, unknown or revoked token."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    found = request.app.state.tokens.authenticate(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
    if found is None:
        raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
    return found


def registry(request: Request) -> AdapterRegistry:
    return request.app.state.registry


def tracker(request: Request) -> JobTracker:
    return request.app.state.tracker


def config(request: Request) -> ApiConfig:
    return request.app.state.config


Auth = Annotated[Principal, Depends(principal)]
Registry = Annotated[AdapterRegistry, Depends(registry)]
Tracker = Annotated[JobTracker, Depends(tracker)]
Config = Annotated[ApiConfig, Depends(config)]


def allowed(who: Principal, user_id: str) -> None:
    """422 for a user_id that is not one, 403 when the token may not act for that user."""
    try:
        check_user_id(user_id)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    if not who.may_act_for(user_id):
        raise HTTPException(403, f"this token may not act for user {user_id!r}")
