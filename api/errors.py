"""Errors as JSON, and a bound on request bodies: the HTTP conventions the API and `adaptloop serve` share.

Every error is `{"error": "<message>", "detail": ...}` with its status: 401
without a valid token, 403 out of scope, 404 for what does not exist, 413 for
a body over the limit, 422 for an invalid request, 503 when a dependency
(Kafka, storage) fails, 500 (logged) for anything unexpected.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import AdaptloopError, VersionNotFound

log = logging.getLogger("adaptloop.api")


def error_response(status: int, message: str, detail: Any = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "detail": detail}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error is JSON; an AdaptloopError is a 404 when something asked for does not exist, else a 503."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        problems = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
        return error_response(422, "invalid request", problems)

    @app.exception_handler(AdaptloopError)
    async def adaptloop_error(_request: Request, exc: AdaptloopError):
        return error_response(404 if isinstance(exc, VersionNotFound) else 503, str(exc))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception):
        log.exception("unexpected error")
        return error_response(500, "internal error", type(exc).__name__)


def install_body_limit(app: FastAPI, max_body_bytes: int, requests_counter) -> None:
    """413 for a body over the limit, 411 for a body of unknown length; every response counted by route and status."""

    @app.middleware("http")
    async def bound_and_count(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            response = error_response(413, f"request body larger than {max_body_bytes} bytes")
        elif length is None and request.method in ("POST", "PUT", "PATCH") and request.headers.get("transfer-encoding"):
            response = error_response(411, "a Content-Length is required")
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        requests_counter.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response
