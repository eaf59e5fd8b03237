"""Review mode: a candidate that passed the gate waits for a person before it becomes active.

    promotion.mode: review                      # everyone (ADAPTLOOP_PROMOTION__MODE=review)
    adaptloop review mode alice review          # one user; `default` goes back to the setting

`apply_decision` (trainer/job.py) opens a review instead of promoting: the
version's history says `awaiting_review` and the reviews log holds the review
(schemas/review.py, trainer/registry.py). It ends in one of three ways:

- approved (`adaptloop review approve ID`, the API, or `review.on_timeout:
  approve`): the version becomes active, as a promotion would have made it;
- denied (`deny ID --reason R`, or the timeout): it never becomes active;
- superseded: a newer version of the same user passed the gate (awaiting its
  own review, or promoted), so the older one is denied with `superseded_by`.

Every decision is taken under the registry's review lock and only on a
pending review, so a review is decided exactly once, whoever races for it (two
trainers settling timeouts, a person approving at the same moment).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from core.errors import ReviewError, StorageError, VersionNotFound
from schemas.review import Review, review_id_of
from trainer.registry import AdapterRegistry, VersionInfo

log = logging.getLogger("adaptloop.review")

PROMOTION_MODES = ("auto", "review")


@dataclass(frozen=True)
class Decision:
    """A review as it was decided, and (for an approval) the version that was active before."""

    review: Review
    previous: int | None = None


def promotion_mode(registry: AdapterRegistry, user_id: str, default: str) -> str:
    """The user's own mode when set, else `default` (the `promotion.mode` setting)."""
    return registry.user_promotion_mode(user_id) or default


def open_review(registry: AdapterRegistry, info: VersionInfo, because: str | None = None) -> tuple[Review, list[Review]]:
    """Put a version that passed the gate up for review: (its review, the older pending reviews it superseded).

    Idempotent: a version's review ID is derived from the version, so doing it
    again (a request redelivered after a crash) finds the same review."""
    review_id = review_id_of(info.user_id, info.version, info.manifest.registered_at)
    with registry.reviews_locked():
        for existing in registry.reviews(info.user_id):
            if existing.review_id == review_id:
                return existing, []
        superseded = _supersede(registry, info.user_id, info.version)
        review = Review(
            review_id=review_id,
            user_id=info.user_id,
            version=info.version,
            opened_at=datetime.now(UTC),
            request_id=info.manifest.request_id,
            opened_because=because,
        )
        registry.mark(info.user_id, info.version, "awaiting_review", review_id=review_id)
        registry.record_review(review)
    log.info("%s v%d awaits review %s", info.user_id, info.version, review_id)
    return review, superseded


def promote(registry: AdapterRegistry, user_id: str, version: int, reason: str) -> list[Review]:
    """Make `version` active (auto mode) and deny the user's pending reviews of older versions: what they offered
    is past. One step under the review lock, so no approval of an older version lands after the newer one."""
    with registry.reviews_locked():
        registry.verify(user_id, version)  # a version that cannot become active replaces nothing
        superseded = _supersede(registry, user_id, version)
        registry.activate(user_id, version, reason=reason)
        return superseded


def _supersede(registry: AdapterRegistry, user_id: str, version: int) -> list[Review]:
    older = [r for r in registry.reviews(user_id) if r.pending and r.version < version]
    return [
        _close(registry, review, False, "superseded", f"superseded by v{version}", superseded_by=version).review
        for review in older
    ]


def decide(
    registry: AdapterRegistry,
    review_id: str,
    approve: bool,
    by: str,
    reason: str | None = None,
    command_id: str | None = None,
) -> Decision:
    """Approve (the version becomes active) or deny a pending review; ReviewError when it is unknown or decided."""
    with registry.reviews_locked():
        review = registry.review(review_id)
        if not review.pending:
            raise ReviewError(
                f"review {review_id} ({review.user_id} v{review.version}) was already {review.status}"
                f" by {review.decided_by}" + (f": {review.reason}" if review.reason else "")
            )
        return _close(registry, review, approve, by, reason, command_id=command_id)


def settle_overdue(registry: AdapterRegistry, timeout_h: float, on_timeout: str, now: datetime | None = None) -> list[Decision]:
    """Decide every review pending longer than `timeout_h` as `on_timeout` says (`approve` or `deny`).

    An approval whose version no longer verifies (its files changed on disk)
    is denied instead: nothing unchecked becomes active."""
    now = now or datetime.now(UTC)
    reason = f"no decision within {timeout_h:g} h (review.on_timeout: {on_timeout})"
    decided = []
    with registry.reviews_locked():
        for review in registry.reviews():
            if not review.pending or now - review.opened_at < timedelta(hours=timeout_h):
                continue
            try:
                decided.append(_close(registry, review, on_timeout == "approve", "timeout", reason))
            except ReviewError as exc:
                log.error("%s; denying it", exc)
                decided.append(_close(registry, review, False, "timeout", str(exc)))
    return decided


def _close(registry: AdapterRegistry, review: Review, approve: bool, by: str, reason: str | None, **fields: Any) -> Decision:
    """Record the decision (the caller holds the review lock and checked the review is pending)."""
    previous = None
    if approve:
        try:
            previous = registry.activate(review.user_id, review.version, reason=f"review {review.review_id} approved by {by}")
        except StorageError as exc:
            raise ReviewError(f"review {review.review_id} cannot be approved: {exc}") from None
    closed = review.model_copy(
        update={
            "status": "approved" if approve else "denied",
            "decided_at": datetime.now(UTC),
            "decided_by": by,
            "reason": reason,
            **fields,
        }
    )
    registry.record_review(closed)
    registry.mark(review.user_id, review.version, closed.status, review_id=review.review_id, by=by, reason=reason)
    log.info("review %s (%s v%d) %s by %s", review.review_id, review.user_id, review.version, closed.status, by)
    return Decision(closed, previous)


# ---- what a reviewer sees ----------------------------------------------------------- #

CHANGED_CORE_SHOWN = 5


def review_details(
    registry: AdapterRegistry,
    review: Review,
    changed_core: int = CHANGED_CORE_SHOWN,
    gate_records: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """What a reviewer decides on: the gate's verdict and scores, every user-suite case before and after, and the
    core prompts whose answers changed most (by how much their score moved).

    `gate_records`: the validation log, when the caller read it once for several reviews."""
    records = registry.validation_results(review.user_id) if gate_records is None else gate_records
    gate = next(
        (
            r
            for r in reversed(records)
            if r.get("user_id", review.user_id) == review.user_id
            and r.get("version") == review.version
            and r.get("kind") == "gate"
        ),
        {},
    )
    suites = gate.get("suites", {})
    try:
        validation = registry.info(review.user_id, review.version).manifest.validation
    except VersionNotFound:  # archived meanwhile: the review shows what the log kept
        validation = None
    core = [c for c in suites.get("core", {}).get("case_scores", []) if c.get("before") not in (None, c.get("answer"))]
    core.sort(key=lambda c: abs(c["score"] - c.get("before_score", c["score"])), reverse=True)
    return {
        "review": review.model_dump(mode="json", exclude_none=True),
        "passed": gate.get("passed"),
        "metrics": gate.get("metrics", {}),
        "user_cases": [_case(c) for c in suites.get("user", {}).get("case_scores", [])],
        "previous_facts": [_case(c) for c in suites.get("previous", {}).get("case_scores", [])],
        "core_changed": [_case(c) for c in core[:changed_core]],
        "contradictions": [c.model_dump() for c in validation.contradictions] if validation is not None else [],
    }


def _case(score: dict[str, Any]) -> dict[str, Any]:
    keep = ("prompt", "expected", "before", "answer", "before_score", "score", "match")
    return {k: score[k] for k in keep if k in score}
