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
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.auth import TokenStore
from api.config import ApiConfig
from api.jobs import JobTracker
from api.metrics import ApiMetrics
from api.routes import adapters, ops
from core.errors import AdaptloopError, VersionNotFound
from trainer.registry import AdapterRegistry

log = logging.getLogger("adaptloop.api")


def _error(status: int, message: str, detail: Any = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "detail": detail}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error is JSON; an AdaptloopError is a 404 when something asked for does not exist, else a 503."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        problems = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
        return _error(422, "invalid request", problems)

    @app.exception_handler(AdaptloopError)
    async def adaptloop_error(_request: Request, exc: AdaptloopError):
        return _error(404 if isinstance(exc, VersionNotFound) else 503, str(exc))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception):
        log.exception("unexpected error")
        return _error(500, "internal error", type(exc).__name__)


def _install_body_limit_and_counts(app: FastAPI, max_body_bytes: int, metrics: ApiMetrics) -> None:
    @app.middleware("http")
    async def bound_and_count(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            response = _error(413, f"request body larger than {max_body_bytes} bytes")
        elif length is None and request.method in ("POST", "PUT", "PATCH") and request.headers.get("transfer-encoding"):
            response = _error(411, "a Content-Length is required")
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response


def create_app(cfg: ApiConfig, tracker: JobTracker | None = None) -> FastAPI:
    tracker = tracker or JobTracker(cfg.client, cfg.commands_topic, cfg.lifecycle_topic, cfg.users_changelog)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        tracker.start()
        try:
            yield
        finally:
            tracker.close()

    app = FastAPI(title="adaptloop API", version="1", description=__doc__, lifespan=lifespan)
    app.state.config = cfg
    app.state.tokens = TokenStore(cfg.tokens_file)
    app.state.registry = AdapterRegistry(cfg.storage_root, cfg.max_versions)
    app.state.tracker = tracker
    app.state.metrics = ApiMetrics(cfg)
    _install_error_handlers(app)
    _install_body_limit_and_counts(app, cfg.max_body_bytes, app.state.metrics)
    app.include_router(ops.router)
    app.include_router(adapters.router)
    app.include_router(adapters.pages)
    return app


def run_api(cfg: ApiConfig, host: str, port: int) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(cfg), host=host, port=port, log_level="info")
