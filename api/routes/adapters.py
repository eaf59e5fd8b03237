"""Trigger, inspect and roll back a user's adapters.

Requests become commands on `adapter.commands` (202 with a `job_id`), carried
out by the worker and the trainers; job state comes from the lifecycle topic
(api/jobs.py), versions from the registry.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import HTMLResponse

from api.deps import Auth, Config, Registry, Tracker, UserIdPath, allowed, job_id
from api.models import JobAccepted, RetrainBody, RollbackBody, ValidateBody
from core.kafka.io import produce
from schemas import RetrainCommand, RollbackCommand, ValidateCommand
from trainer.report import build_report, version_rows

router = APIRouter(prefix="/api/adapter", tags=["adapter"])
pages = APIRouter(tags=["adapter"])

JobId = Annotated[str, Path(max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]


def publish(request: Request, command) -> JobAccepted:
    """Send the command; only once Kafka has it is it a job (a command that never got there leaves no `queued` job)."""
    tracker, cfg = request.app.state.tracker, request.app.state.config
    produce(cfg.client, cfg.commands_topic, [(command.user_id, command.to_bytes())], timeout=cfg.command_timeout_s)
    tracker.add(command.command_id, command.type, command.user_id)
    request.app.state.metrics.commands.labels(command.type).inc()
    return JobAccepted(job_id=command.command_id)


@router.post("/retrain", status_code=202, response_model=JobAccepted)
def retrain(body: RetrainBody, who: Auth, request: Request) -> JobAccepted:
    allowed(who, body.user_id)
    command = RetrainCommand(
        command_id=job_id(),
        user_id=body.user_id,
        trigger=body.trigger,
        include_global=body.include_global,
        requested_by=f"api:{who.token_id}",
    )
    return publish(request, command)


@router.post("/validate", status_code=202, response_model=JobAccepted)
def validate(body: ValidateBody, who: Auth, request: Request) -> JobAccepted:
    allowed(who, body.user_id)
    command = ValidateCommand(
        command_id=job_id(),
        user_id=body.user_id,
        version=body.version,
        baseline_version=body.baseline_version,
        requested_by=f"api:{who.token_id}",
    )
    return publish(request, command)


@router.post("/rollback", status_code=202, response_model=JobAccepted)
def rollback(body: RollbackBody, who: Auth, request: Request) -> JobAccepted:
    allowed(who, body.user_id)
    command = RollbackCommand(
        command_id=job_id(),
        user_id=body.user_id,
        reason=body.reason,
        to_version=body.to_version,
        requested_by=f"api:{who.token_id}",
    )
    return publish(request, command)


@router.get("/job/{job_id}")
def job(job_id: JobId, who: Auth, tracker: Tracker) -> dict:
    found = tracker.get(job_id)
    if found is None:
        raise HTTPException(404, f"no job {job_id}")
    allowed(who, found.user_id)
    return asdict(found)


@router.get("/status/{user_id}")
def status(user_id: UserIdPath, who: Auth, registry: Registry, tracker: Tracker) -> dict:
    allowed(who, user_id)
    active = registry.active(user_id)
    metrics = registry.info(user_id, active).manifest.metrics if active else None
    versions = registry.versions(user_id)
    latest = versions[-1].manifest if versions else None
    with tracker.lock:
        gaps = tracker.activity.pending_gaps.get(user_id, 0)
        consenting = user_id not in tracker.activity.opted_out
        view = tracker.requests.of(user_id)
        job = None if view is None else asdict(view) | {"open": view.open, "summary": view.describe()}
    return {
        "user_id": user_id,
        "active_version": active,
        "validation_score": metrics.user_score if metrics else None,
        "core_score": metrics.core_score if metrics else None,
        "last_training": None
        if latest is None
        else {
            "version": latest.version,
            "trained_at": latest.trained_at.isoformat() if latest.trained_at else None,
            "trigger": latest.trigger,
            "passed": latest.validation.passed if latest.validation else None,
        },
        "pending_gaps": gaps,
        "pending_reviews": [
            {"review_id": r.review_id, "version": r.version} for r in registry.reviews(user_id) if r.pending
        ],  # versions that passed the gate and wait for a person (review mode)
        "training_consent": consenting,
        "job": job,  # the user's latest training request: queued, training (with progress), gating, ... or how it ended
    }


@router.get("/review-requests/{user_id}")
def review_requests(user_id: UserIdPath, who: Auth, tracker: Tracker) -> list[dict]:
    """The user's open labelling tasks (streams/active.py): questions worth answering, best first within a day's budget.

    Answer one with a correction event carrying its `review_request_id`."""
    allowed(who, user_id)
    return tracker.open_tasks(user_id)


@router.get("/history/{user_id}")
def history(user_id: UserIdPath, who: Auth, registry: Registry) -> list[dict]:
    allowed(who, user_id)
    return [{k: v for k, v in row.items() if k not in ("reasons", "sha256")} for row in version_rows(registry, user_id)]


@pages.get("/dashboard/{user_id}", response_class=HTMLResponse)
def dashboard(user_id: UserIdPath, who: Auth, registry: Registry, cfg: Config) -> HTMLResponse:
    """The page `adaptloop report` writes: version history, score chart, loss curves."""
    allowed(who, user_id)
    return HTMLResponse(build_report(registry, user_id, cfg.promote_if_score).html)
