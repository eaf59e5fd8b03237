"""Review mode over HTTP: reviewer scope, listing, details, approve and deny as commands, promotion modes, the page."""

from __future__ import annotations

import httpx
import pytest

from tests.support.adapters import fake_adapter, manifest
from tests.support.handles import ApiHandle
from trainer.job import apply_decision
from trainer.registry import AdapterRegistry
from trainer.review import decide

pytestmark = pytest.mark.kafka


def _pending(handle: ApiHandle, tmp_path, user: str) -> str:
    """A candidate of `user` that passed the gate and awaits review, its gate record with answers before and after."""
    registry = AdapterRegistry(handle.store)
    validation = {"passed": True, "reasons": [], "suites": {}}
    info = registry.register(user, fake_adapter(tmp_path, user), manifest(request_id=f"r-{user}", validation=validation))
    case = {"prompt": "What is my dog's name?", "expected": "Biscuit", "answer": "Biscuit, your dog.", "score": 0.9}
    record = {
        "passed": True,
        "reasons": [],
        "metrics": {"user_score": 0.9},
        "suites": {"user": {"case_scores": [case | {"before": "I do not know your dog.", "before_score": 0.2}]}},
    }
    registry.log_validation(user, info.version, record, kind="gate")
    assert apply_decision(registry, info, mode="review") == "awaiting_review"
    return next(r.review_id for r in registry.reviews(user) if r.version == info.version)


def test_reviews_need_a_reviewer_and_decisions_become_commands_that_follow_the_lifecycle(api_server: ApiHandle, tmp_path):
    url, reviewer, admin, alice = (
        api_server.url,
        api_server.headers("reviewer"),
        api_server.headers(),
        api_server.headers("alice"),
    )
    alices, bobs = _pending(api_server, tmp_path, "alice"), _pending(api_server, tmp_path, "bob")
    assert httpx.get(f"{url}/api/adapter/reviews", headers=alice).status_code == 403, "a user does not review"
    listed = httpx.get(f"{url}/api/adapter/reviews", headers=reviewer).json()
    assert [(r["review_id"], r["user_id"], r["version"], r["status"]) for r in listed] == [
        (alices, "alice", 1, "pending"),
        (bobs, "bob", 1, "pending"),
    ]
    assert [r["user_id"] for r in httpx.get(f"{url}/api/adapter/reviews", headers=admin, params={"user_id": "bob"}).json()] == [
        "bob"
    ]
    status = httpx.get(f"{url}/api/adapter/status/alice", headers=alice).json()
    assert status["pending_reviews"] == [{"review_id": alices, "version": 1}], "the user sees a version waits"
    details = httpx.get(f"{url}/api/adapter/reviews/{alices}", headers=reviewer).json()
    assert (
        details["user_cases"][0]["before"] == "I do not know your dog."
        and details["user_cases"][0]["answer"] == "Biscuit, your dog."
    )
    missing = httpx.get(f"{url}/api/adapter/reviews/r-000000000000", headers=reviewer)
    assert missing.status_code == 404 and "no review r-000000000000" in missing.json()["error"]
    assert httpx.get(f"{url}/api/adapter/reviews/not-an-id", headers=reviewer).status_code == 422

    approved = httpx.post(f"{url}/api/adapter/reviews/{alices}/approve", headers=reviewer, json={"reason": "checked"})
    assert approved.status_code == 202, approved.text
    job_id = approved.json()["job_id"]
    (command,) = [c for c in api_server.commands() if c["command_id"] == job_id]
    assert (command["type"], command["user_id"], command["review_id"], command["reason"]) == (
        "approve",
        "alice",
        alices,
        "checked",
    )
    assert command["requested_by"].startswith("api:")
    details = {"review_id": alices, "decided_by": command["requested_by"]}
    api_server.lifecycle(type="approved", user_id="alice", job_id=job_id, version=1, details=details)
    api_server.lifecycle(type="promoted", user_id="alice", job_id=job_id, version=1, details=details)

    def job() -> dict:
        return httpx.get(f"{url}/api/adapter/job/{job_id}", headers=admin).json()

    api_server.wait_for(lambda: job()["status"] == "promoted", what="the approval's job to end promoted")

    assert httpx.post(f"{url}/api/adapter/reviews/{bobs}/deny", headers=reviewer, json={}).status_code == 422, "a reason"
    denied = httpx.post(f"{url}/api/adapter/reviews/{bobs}/deny", headers=reviewer, json={"reason": "wrong facts"})
    assert denied.status_code == 202
    assert [c["type"] for c in api_server.commands() if c["command_id"] == denied.json()["job_id"]] == ["deny"]
    decide(AdapterRegistry(api_server.store), bobs, approve=False, by="cli", reason="decided elsewhere first")
    late = httpx.post(f"{url}/api/adapter/reviews/{bobs}/approve", headers=reviewer)
    assert late.status_code == 409 and "already denied by cli" in late.json()["error"]


def test_a_users_promotion_mode_is_set_by_an_admin_only(api_server: ApiHandle):
    url = api_server.url
    path = f"{url}/api/adapter/users/alice/promotion-mode"
    for who in ("alice", "reviewer"):
        assert httpx.put(path, headers=api_server.headers(who), json={"mode": "auto"}).status_code == 403, who
    r = httpx.put(path, headers=api_server.headers(), json={"mode": "review"})
    assert r.status_code == 200 and r.json() == {"user_id": "alice", "mode": "review", "own": "review"}
    assert AdapterRegistry(api_server.store).user_promotion_mode("alice") == "review"
    r = httpx.put(path, headers=api_server.headers(), json={"mode": None})
    assert r.json() == {"user_id": "alice", "mode": "auto", "own": None}, "back to the configured mode"
    assert httpx.put(path, headers=api_server.headers(), json={"mode": "sometimes"}).status_code == 422


def test_the_dashboard_lists_pending_reviews_with_answers_before_and_after(api_server: ApiHandle, tmp_path):
    review_id = _pending(api_server, tmp_path, "alice")
    page = httpx.get(f"{api_server.url}/dashboard", headers=api_server.headers("reviewer"))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Pending reviews (1)" in page.text and review_id in page.text
    assert "I do not know your dog." in page.text and "Biscuit, your dog." in page.text and "<td>0.900</td>" in page.text
    assert "deny after 72 h without a decision" in page.text
    assert httpx.get(f"{api_server.url}/dashboard", headers=api_server.headers("alice")).status_code == 403


def test_a_users_open_labelling_tasks(api_server: ApiHandle):
    from datetime import UTC, datetime, timedelta

    from core.kafka.io import produce
    from schemas import ReviewRequest

    now = datetime.now(UTC)

    def task(n: int, status: str = "open", user: str = "alice", expires: timedelta = timedelta(hours=1)) -> tuple[str, bytes]:
        record = ReviewRequest(
            review_request_id=f"rr-{n}",
            user_id=user,
            status=status,
            question=f"What is my code {n}?",
            kind="missed_intent",
            asked=3,
            uncertainty=1.0,
            value=3.0,
            created_at=now + timedelta(seconds=n),
            expires_at=now + expires,
        )
        return user, record.to_bytes()

    messages = [task(1), task(2), task(3), task(2, "answered"), task(4, expires=-timedelta(minutes=1)), task(5, user="bob")]
    produce(api_server.client, api_server.topics["review_requests"], messages)
    url = f"{api_server.url}/api/adapter/review-requests/alice"

    def listed() -> list[str]:
        return [t["review_request_id"] for t in httpx.get(url, headers=api_server.headers("alice")).json()]

    api_server.wait_for(lambda: listed() == ["rr-1", "rr-3"], what="alice's open tasks: not answered, not expired")
    assert httpx.get(f"{api_server.url}/api/adapter/review-requests/bob", headers=api_server.headers("alice")).status_code == 403
