"""Review mode over HTTP (trainer/review.py): see, approve and deny candidates that wait for a person.

    GET  /api/adapter/reviews?status=pending|all&user_id=U      the reviews, newest state each
    GET  /api/adapter/reviews/{review_id}                       what to decide on (scores, answers before and after)
    POST /api/adapter/reviews/{review_id}/approve  {"reason"?}   202 with a job_id: `approved`, then `promoted`
    POST /api/adapter/reviews/{review_id}/deny     {"reason"}    202 with a job_id: `denied`
    PUT  /api/adapter/users/{user_id}/promotion-mode {"mode": "auto" | "review" | null}   admin only
    GET  /dashboard                                             the pending reviews as a page

Reviews need an `admin` or a `reviewer` token. Decisions become `approve` and
`deny` commands, carried out by the trainers like a rollback; an unknown or
already decided review is refused here at once (404, 409).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse

from api.auth import Principal
from api.deps import Auth, Config, Registry, UserIdPath, allowed, job_id
from api.models import ApproveBody, DenyBody, JobAccepted, PromotionMode, PromotionModeBody
from api.review_page import review_page
from api.routes.adapters import publish
from core.errors import ReviewError
from schemas import ApproveCommand, DenyCommand, Review
from schemas.common import UserId
from schemas.review import REVIEW_ID_PATTERN
from trainer.registry import AdapterRegistry
from trainer.review import promotion_mode, review_details

router = APIRouter(tags=["review"])

ReviewIdPath = Annotated[
    str, Path(pattern=REVIEW_ID_PATTERN, description="a review's ID, as `GET /api/adapter/reviews` lists it")
]


def _reviewer(who: Principal) -> None:
    if not who.may_review:
        raise HTTPException(403, "reviews need an admin or a reviewer token")


def _review(registry: AdapterRegistry, review_id: str) -> Review:
    try:
        return registry.review(review_id)
    except ReviewError as exc:
        raise HTTPException(404, str(exc)) from None


@router.get("/api/adapter/reviews", response_model=list[Review])
def reviews(
    who: Auth,
    registry: Registry,
    status: Literal["pending", "all"] = "pending",
    user_id: Annotated[UserId | None, Query()] = None,
) -> list[Review]:
    _reviewer(who)
    return [r for r in registry.reviews(user_id) if status == "all" or r.pending]


@router.get("/api/adapter/reviews/{review_id}")
def review(review_id: ReviewIdPath, who: Auth, registry: Registry) -> dict:
    _reviewer(who)
    return review_details(registry, _review(registry, review_id))


def _decide(request: Request, who: Principal, review_id: str, approve: bool, reason: str | None) -> JobAccepted:
    _reviewer(who)
    found = _review(request.app.state.registry, review_id)
    if not found.pending:
        raise HTTPException(409, f"review {review_id} was already {found.status} by {found.decided_by}")
    kind = ApproveCommand if approve else DenyCommand
    command = kind(
        command_id=job_id(), user_id=found.user_id, review_id=review_id, reason=reason, requested_by=f"api:{who.token_id}"
    )
    return publish(request, command)


@router.post("/api/adapter/reviews/{review_id}/approve", status_code=202, response_model=JobAccepted)
def approve(review_id: ReviewIdPath, who: Auth, request: Request, body: ApproveBody | None = None) -> JobAccepted:
    return _decide(request, who, review_id, True, body.reason if body else None)


@router.post("/api/adapter/reviews/{review_id}/deny", status_code=202, response_model=JobAccepted)
def deny(review_id: ReviewIdPath, body: DenyBody, who: Auth, request: Request) -> JobAccepted:
    return _decide(request, who, review_id, False, body.reason)


@router.put("/api/adapter/users/{user_id}/promotion-mode", response_model=PromotionMode)
def set_promotion_mode(user_id: UserIdPath, body: PromotionModeBody, who: Auth, registry: Registry, cfg: Config) -> PromotionMode:
    """One user's promotion mode (null: the configured one again); admin only, since `auto` skips review."""
    allowed(who, user_id)
    if not who.is_admin:
        raise HTTPException(403, "only an admin token may set a promotion mode")
    registry.set_user_promotion_mode(user_id, body.mode, by=f"api:{who.token_id}")
    return PromotionMode(user_id=user_id, mode=promotion_mode(registry, user_id, cfg.promotion_mode), own=body.mode)


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard(who: Auth, registry: Registry, cfg: Config) -> HTMLResponse:
    """Every pending review, with the gate's per-case scores and the answers before and after."""
    _reviewer(who)
    log = registry.validation_results()  # read once for every pending review
    pending = [review_details(registry, r, gate_records=log) for r in registry.reviews() if r.pending]
    timeout = f"{cfg.review_on_timeout} after {cfg.review_timeout_h:g} h without a decision"
    return HTMLResponse(review_page(pending, timeout))
