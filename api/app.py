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

from fastapi import FastAPI

from api.auth import TokenStore
from api.config import ApiConfig
from api.errors import install_body_limit, install_error_handlers
from api.jobs import JobTracker
from api.metrics import ApiMetrics
from api.routes import adapters, ops, privacy, reviews
from core.encryption import sealer_for
from trainer.registry import AdapterRegistry

log = logging.getLogger("adaptloop.api")


def create_app(cfg: ApiConfig, tracker: JobTracker | None = None) -> FastAPI:
    tracker = tracker or JobTracker(
        cfg.client, cfg.commands_topic, cfg.lifecycle_topic, cfg.users_changelog, cfg.requests_topic, cfg.review_requests_topic
    )

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
    app.state.registry = AdapterRegistry(cfg.storage_root, cfg.max_versions, sealer_for(cfg.storage_root, cfg.encryption))
    app.state.tracker = tracker
    app.state.metrics = ApiMetrics(cfg)
    install_error_handlers(app)
    install_body_limit(app, cfg.max_body_bytes, app.state.metrics.requests)
    app.include_router(ops.router)
    app.include_router(adapters.router)
    app.include_router(adapters.pages)
    app.include_router(privacy.router)
    app.include_router(reviews.router)
    return app


def run_api(cfg: ApiConfig, host: str, port: int) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(cfg), host=host, port=port, log_level="info")
