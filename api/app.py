"""The HTTP API for the adapter lifecycle: trigger, inspect, roll back.

    adaptloop api [--host 127.0.0.1] [--port 8000]       # OpenAPI docs at /docs
    adaptloop api token create --scope admin             # prints a bearer token once

The API never trains: retrain, validate and rollback requests become commands
on `adapter.commands` (202 with a `job_id`), carried out by the worker and the
trainers; job state is materialised from `adapter.lifecycle` (api/jobs.py) and
versions are read from the registry. Every endpoint but `/healthz` needs
`Authorization: Bearer <token>` (401 without a valid one, 403 out of scope).
Every error is JSON: `{"error": ..., "detail": ...}`.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaptloop.errors import AdaptloopError, StorageError
from adaptloop.kafka.client import ClientConfig
from adaptloop.kafka.io import produce
from adaptloop.kafka.lag import ConsumerLagCollector
from api.auth import Principal, TokenStore
from api.jobs import JobTracker
from schemas import RetrainCommand, RollbackCommand, ValidateCommand
from schemas.common import USER_ID_PATTERN, ShortText, Text, UserId, check_user_id
from trainer.registry import AdapterRegistry
from trainer.report import build_report, version_rows

log = logging.getLogger("adaptloop.api")

UserIdPath = Annotated[str, PathParam(pattern=USER_ID_PATTERN, max_length=128, description="the user's id")]


@dataclass(frozen=True)
class ApiConfig:
    client: ClientConfig
    commands_topic: str
    lifecycle_topic: str
    users_changelog: str | None
    storage_root: str
    max_versions: int
    tokens_file: Path
    max_body_bytes: int = 64 * 1024
    promote_if_score: float | None = None  # drawn on the dashboard's score chart
    lag_groups: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (consumer group, its topics) whose lag /metrics shows


# ---- authentication ---------------------------------------------------------------- #


def principal(request: Request) -> Principal:
    """The bearer token's principal; 401 for a missing, malformed, unknown or revoked token."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    found = request.app.state.tokens.authenticate(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
    if found is None:
        raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
    return found


Auth = Annotated[Principal, Depends(principal)]


# ---- request and response bodies ------------------------------------------------- #


class _Body(BaseModel):
    model_config = {"extra": "forbid"}


class RetrainBody(_Body):
    user_id: UserId
    trigger: ShortText = "on-demand"
    include_global: bool = False


class ValidateBody(_Body):
    user_id: UserId
    version: int = Field(ge=1)
    baseline_version: int | None = Field(None, ge=1)


class RollbackBody(_Body):
    user_id: UserId
    reason: Text
    to_version: int | None = Field(None, ge=1)


class JobAccepted(BaseModel):
    job_id: str
    status: str = "queued"


# ---- the app ------------------------------------------------------------------------ #


def create_app(cfg: ApiConfig, tracker: JobTracker | None = None) -> FastAPI:
    tokens = TokenStore(cfg.tokens_file)
    registry = AdapterRegistry(cfg.storage_root, cfg.max_versions)
    tracker = tracker or JobTracker(cfg.client, cfg.commands_topic, cfg.lifecycle_topic, cfg.users_changelog)
    metrics = CollectorRegistry()
    requests_total = Counter("adaptloop_api_requests_total", "HTTP requests", ["route", "status"], registry=metrics)
    commands_total = Counter("adaptloop_api_commands_total", "commands published", ["type"], registry=metrics)
    jobs_gauge = Gauge("adaptloop_api_jobs", "jobs known to this API process, by status", ["status"], registry=metrics)
    if cfg.lag_groups:
        metrics.register(ConsumerLagCollector(cfg.client, {group: list(topics) for group, topics in cfg.lag_groups}))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        tracker.start()
        try:
            yield
        finally:
            tracker.close()

    app = FastAPI(title="adaptloop API", version="1", description=__doc__, lifespan=lifespan)

    # ---- errors: always JSON --------------------------------------------------------- #

    def error(status: int, message: str, detail: Any = None, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message, "detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        problems = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
        return error(422, "invalid request", problems)

    @app.exception_handler(AdaptloopError)
    async def adaptloop_error(_request: Request, exc: AdaptloopError):
        return error(404 if isinstance(exc, StorageError) and "has no version" in str(exc) else 503, str(exc))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception):
        log.exception("unexpected error")
        return error(500, "internal error", type(exc).__name__)

    @app.middleware("http")
    async def bound_and_count(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            response = error(413, f"request body larger than {cfg.max_body_bytes} bytes")
        elif length is None and request.method in ("POST", "PUT", "PATCH") and request.headers.get("transfer-encoding"):
            response = error(411, "a Content-Length is required")
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        requests_total.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    # ---- auth ------------------------------------------------------------------------- #

    app.state.tokens = tokens

    def allowed(who: Principal, user_id: str) -> None:
        try:
            check_user_id(user_id)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        if not who.may_act_for(user_id):
            raise HTTPException(403, f"this token may not act for user {user_id!r}")

    def publish(command) -> JobAccepted:
        tracker.add(command.command_id, command.type, command.user_id)
        produce(cfg.client, cfg.commands_topic, [(command.user_id, command.to_bytes())], timeout=15)
        commands_total.labels(command.type).inc()
        return JobAccepted(job_id=command.command_id)

    def job_id() -> str:
        return f"job-{uuid.uuid4().hex}"

    # ---- routes ------------------------------------------------------------------------- #

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict:
        return {"status": "ok", "lifecycle_caught_up": tracker.caught_up.is_set()}

    @app.post("/api/adapter/retrain", status_code=202, response_model=JobAccepted, tags=["adapter"])
    def retrain(body: RetrainBody, who: Auth) -> JobAccepted:
        allowed(who, body.user_id)
        return publish(RetrainCommand(command_id=job_id(), user_id=body.user_id, trigger=body.trigger,
                                      include_global=body.include_global, requested_by=f"api:{who.token_id}"))  # fmt: skip

    @app.post("/api/adapter/validate", status_code=202, response_model=JobAccepted, tags=["adapter"])
    def validate(body: ValidateBody, who: Auth) -> JobAccepted:
        allowed(who, body.user_id)
        return publish(ValidateCommand(command_id=job_id(), user_id=body.user_id, version=body.version,
                                       baseline_version=body.baseline_version, requested_by=f"api:{who.token_id}"))  # fmt: skip

    @app.post("/api/adapter/rollback", status_code=202, response_model=JobAccepted, tags=["adapter"])
    def rollback(body: RollbackBody, who: Auth) -> JobAccepted:
        allowed(who, body.user_id)
        return publish(RollbackCommand(command_id=job_id(), user_id=body.user_id, reason=body.reason,
                                       to_version=body.to_version, requested_by=f"api:{who.token_id}"))  # fmt: skip

    @app.get("/api/adapter/job/{job_id}", tags=["adapter"])
    def job(job_id: Annotated[str, PathParam(max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")], who: Auth) -> dict:
        found = tracker.get(job_id)
        if found is None:
            raise HTTPException(404, f"no job {job_id}")
        allowed(who, found.user_id)
        return asdict(found)

    @app.get("/api/adapter/status/{user_id}", tags=["adapter"])
    def status(user_id: UserIdPath, who: Auth) -> dict:
        allowed(who, user_id)
        active = registry.active(user_id)
        metrics_of_active = registry.info(user_id, active).manifest.get("metrics", {}) if active else {}
        versions = registry.versions(user_id)
        latest = versions[-1].manifest if versions else {}
        with tracker.lock:
            gaps = tracker.activity.pending_gaps.get(user_id, 0)
        return {
            "user_id": user_id,
            "active_version": active,
            "validation_score": metrics_of_active.get("user_score"),
            "core_score": metrics_of_active.get("core_score"),
            "last_training": {"version": latest.get("version"), "trained_at": latest.get("trained_at"),
                              "trigger": latest.get("trigger"), "passed": latest.get("validation", {}).get("passed")}
            if latest else None,
            "pending_gaps": gaps,
        }  # fmt: skip

    @app.get("/api/adapter/history/{user_id}", tags=["adapter"])
    def history(user_id: UserIdPath, who: Auth) -> list[dict]:
        allowed(who, user_id)
        return [{k: v for k, v in row.items() if k not in ("reasons", "sha256")} for row in version_rows(registry, user_id)]

    @app.get("/dashboard/{user_id}", tags=["adapters"], response_class=HTMLResponse)
    def dashboard(user_id: UserIdPath, who: Auth) -> HTMLResponse:
        """The page `adaptloop report` writes: version history, score chart, loss curves."""
        allowed(who, user_id)
        return HTMLResponse(build_report(registry, user_id, cfg.promote_if_score).html)

    @app.get("/api/adapter/metrics", tags=["ops"])
    def adapter_metrics(who: Auth) -> dict:
        import time

        if not who.is_admin:
            raise HTTPException(403, "metrics across users need an admin token")
        users = registry.users()
        actives = [(u, registry.active(u)) for u in users]
        scores = [registry.info(u, v).manifest.get("metrics", {}).get("user_score") for u, v in actives if v]
        scores = [s for s in scores if isinstance(s, (int, float))]
        day_ago, week_ago = time.time() - 86400, time.time() - 7 * 86400
        with tracker.lock:
            recent = sum(1 for t in tracker.activity.trainings if t >= day_ago)
            rollbacks = sum(1 for t in tracker.activity.rollbacks if t >= week_ago)
        return {
            "total_adapters": sum(len(registry.versions(u)) for u in users),
            "active_users": sum(1 for _u, v in actives if v),
            "recent_trainings_24h": recent,
            "average_validation_score": round(sum(scores) / len(scores), 4) if scores else None,
            "rollbacks_7d": rollbacks,
            "rollback_frequency_per_day": round(rollbacks / 7, 4),
        }

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def prometheus(who: Auth) -> PlainTextResponse:
        for name, count in tracker.counts().items():
            jobs_gauge.labels(name).set(count)
        return PlainTextResponse(generate_latest(metrics).decode(), media_type="text/plain; version=0.0.4")

    return app


def run_api(cfg: ApiConfig, host: str, port: int) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(cfg), host=host, port=port, log_level="info")
