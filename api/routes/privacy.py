"""A person's rights over their data: consent, a copy of everything held, erasure (privacy/).

    PUT    /api/adapter/users/{user_id}/consent   {"train": false}   opt out of training (or back in)
    GET    /api/adapter/users/{user_id}/export                        a zip of everything held about the user
    DELETE /api/adapter/users/{user_id}?reason=...                    forget the user everywhere

Both take the user's own token or an admin's.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response

from api.deps import Auth, Config, UserIdPath, allowed, job_id
from api.models import ConsentAccepted, ConsentBody
from core.kafka.io import produce
from privacy.export import export_user, read_worker_holdings
from privacy.forget import ForgetResult, forget_user
from schemas import ConsentCommand
from schemas.common import Text

router = APIRouter(prefix="/api/adapter/users", tags=["privacy"])


@router.put("/{user_id}/consent", status_code=202, response_model=ConsentAccepted)
def consent(user_id: UserIdPath, body: ConsentBody, who: Auth, request: Request) -> ConsentAccepted:
    """Opt a user out of training (`train: false`: pending examples dropped, no requests) or back in."""
    allowed(who, user_id)
    command = ConsentCommand(command_id=job_id(), user_id=user_id, train=body.train, requested_by=f"api:{who.token_id}")
    cfg = request.app.state.config
    produce(cfg.client, cfg.commands_topic, [(user_id, command.to_bytes())], timeout=cfg.command_timeout_s)
    request.app.state.metrics.commands.labels("consent").inc()
    return ConsentAccepted(user_id=user_id, train=body.train, command_id=command.command_id)


@router.get("/{user_id}/export", response_class=Response)
def export(user_id: UserIdPath, who: Auth, cfg: Config) -> Response:
    """Everything held about the user (`adaptloop export`'s directory), as a zip with a README.md inside."""
    allowed(who, user_id)
    if cfg.export is None:
        raise HTTPException(503, "exports are not configured on this server")
    held = read_worker_holdings(cfg.export, user_id, timeout=cfg.command_timeout_s)
    with tempfile.TemporaryDirectory(prefix="adaptloop-export-") as tmp:
        out = Path(tmp) / user_id
        export_user(cfg.export, user_id, out, held)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(p for p in out.rglob("*") if p.is_file()):
                archive.write(path, str(path.relative_to(out.parent)))
    headers = {"Content-Disposition": f'attachment; filename="adaptloop-export-{user_id}.zip"'}
    return Response(buffer.getvalue(), media_type="application/zip", headers=headers)


@router.delete("/{user_id}", response_model=ForgetResult)
def forget(
    user_id: UserIdPath,
    who: Auth,
    cfg: Config,
    request: Request,
    reason: Annotated[Text, Query(max_length=500)] = "erasure requested through the API",
) -> ForgetResult:
    """Erase the user: datasets, adapters, logs (tombstoned), the worker's state; `adaptloop forget`'s steps."""
    allowed(who, user_id)
    if cfg.forget is None:
        raise HTTPException(503, "forgetting is not configured on this server")
    result = forget_user(cfg.forget, user_id, reason, requested_by=f"api:{who.token_id}")
    # The user's tokens name them: revoked too (the caller's own, if it was theirs, ends with this answer).
    revoked = request.app.state.tokens.forget_user(user_id)
    request.app.state.metrics.commands.labels("forget").inc()
    return result.model_copy(update={"removed": [*result.removed, f"api tokens of the user: {revoked}"]} if revoked else {})
