"""Health, Prometheus metrics, and the adapter figures across users (admin)."""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import PlainTextResponse

from api.deps import Auth, Registry, Tracker

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz(tracker: Tracker) -> dict:
    return {"status": "ok", "lifecycle_caught_up": tracker.caught_up.is_set()}


@router.get("/api/adapter/metrics")
def adapter_metrics(who: Auth, registry: Registry, tracker: Tracker) -> dict:
    if not who.is_admin:
        raise HTTPException(403, "metrics across users need an admin token")
    users = registry.users()
    actives = [(u, registry.active(u)) for u in users]
    scores = [registry.info(u, v).manifest.metrics.user_score for u, v in actives if v]
    scores = [s for s in scores if s is not None]
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


@router.get("/metrics", response_class=PlainTextResponse)
def prometheus(who: Auth, request: Request, tracker: Tracker) -> PlainTextResponse:
    body = request.app.state.metrics.render(tracker.counts())
    return PlainTextResponse(body.decode(), media_type="text/plain; version=0.0.4")
