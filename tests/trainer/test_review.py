"""Review mode on the registry: open, approve, deny, supersede, time out; each review decided once."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from core.errors import ReviewError
from schemas.manifest import ValidationRecord
from tests.support.adapters import fake_adapter, manifest
from trainer.job import apply_decision
from trainer.registry import AdapterRegistry
from trainer.review import decide, promotion_mode, review_details, settle_overdue

pytestmark = pytest.mark.unit

PASSED = ValidationRecord(passed=True, reasons=[], reference_version=None, suites={})
FAILED = ValidationRecord(passed=False, reasons=["user suite scored 0.1"], reference_version=None, suites={})


def _candidate(registry: AdapterRegistry, tmp_path, user: str, n: int, validation=PASSED):
    adapter = fake_adapter(tmp_path, f"{user}-{n}", payload=f"weights {user} {n}".encode())
    return registry.register(user, adapter, manifest(request_id=f"req-{user}-{n}", validation=validation))


def _statuses(registry: AdapterRegistry, user: str, version: int) -> list[str]:
    return [e["status"] for e in registry.history(user) if e["version"] == version]


def test_in_review_mode_a_passed_candidate_waits_and_approval_makes_it_active(tmp_path):
    registry = AdapterRegistry(tmp_path / "store")
    info = _candidate(registry, tmp_path, "ann", 1)
    assert apply_decision(registry, info, mode="review") == "awaiting_review"
    assert apply_decision(registry, info, mode="review") == "awaiting_review", "redone after a crash: the same review"
    (review,) = registry.reviews()
    assert review.pending and (review.user_id, review.version, review.request_id) == ("ann", 1, "req-ann-1")
    assert registry.active("ann") is None, "nothing reaches the user before a person approves"
    decision = decide(registry, review.review_id, approve=True, by="api:tok1", reason="looks right", command_id="c1")
    assert decision.review.status == "approved" and decision.previous is None
    assert registry.active("ann") == 1
    assert _statuses(registry, "ann", 1) == ["candidate", "awaiting_review", "active", "approved"]
    assert apply_decision(registry, info, mode="review") == "promoted", "a redelivered request now finds it active"
    audit = [(e["event"], e.get("by")) for e in registry.audit_log() if e["event"] in ("awaiting_review", "approved")]
    assert audit == [("awaiting_review", None), ("approved", "api:tok1")], "who decided is audited"
    with pytest.raises(ReviewError, match="already approved by api:tok1"):
        decide(registry, review.review_id, approve=False, by="cli", reason="too late")


def test_a_denied_version_never_becomes_active_and_a_failed_one_never_waits(tmp_path):
    registry = AdapterRegistry(tmp_path / "store")
    assert apply_decision(registry, _candidate(registry, tmp_path, "bo", 1, FAILED), mode="review") == "rejected"
    assert registry.reviews() == [], "the gate's rejection needs nobody's review"
    apply_decision(registry, _candidate(registry, tmp_path, "bo", 2), mode="review")
    (review,) = registry.reviews("bo")
    denied = decide(registry, review.review_id, approve=False, by="cli", reason="answers too long").review
    assert (denied.status, denied.decided_by, denied.reason) == ("denied", "cli", "answers too long")
    assert registry.active("bo") is None and "active" not in _statuses(registry, "bo", 2)
    with pytest.raises(ReviewError, match="no review r-000000000000"):
        decide(registry, "r-000000000000", approve=True, by="cli")


def test_a_newer_candidate_supersedes_a_pending_review_in_either_mode(tmp_path):
    registry = AdapterRegistry(tmp_path / "store")
    apply_decision(registry, _candidate(registry, tmp_path, "cy", 1), mode="review")
    apply_decision(registry, _candidate(registry, tmp_path, "cy", 2), mode="review")
    first, second = registry.reviews("cy")
    assert (first.status, first.superseded_by, first.decided_by) == ("denied", 2, "superseded") and second.pending
    apply_decision(registry, _candidate(registry, tmp_path, "cy", 3, FAILED), mode="review")
    assert registry.review(second.review_id).pending, "a newer candidate the gate rejected replaces nothing"
    apply_decision(registry, _candidate(registry, tmp_path, "cy", 4), mode="auto")
    assert registry.review(second.review_id).superseded_by == 4 and registry.active("cy") == 4
    with pytest.raises(ReviewError, match="already denied by superseded"):
        decide(registry, second.review_id, approve=True, by="cli")


def test_overdue_reviews_are_decided_by_the_setting_and_a_changed_version_is_never_approved(tmp_path):
    registry = AdapterRegistry(tmp_path / "store")
    for user in ("dee", "eve", "fay"):
        apply_decision(registry, _candidate(registry, tmp_path, user, 1), mode="review")
    (registry.version_dir("fay", 1) / "adapter_model.safetensors").write_bytes(b"changed on disk")
    assert settle_overdue(registry, timeout_h=1, on_timeout="approve") == [], "nothing is overdue yet"
    later = datetime.now(UTC) + timedelta(hours=2)
    decided = {d.review.user_id: d.review for d in settle_overdue(registry, timeout_h=1, on_timeout="approve", now=later)}
    assert {u: r.status for u, r in decided.items()} == {"dee": "approved", "eve": "approved", "fay": "denied"}
    assert decided["dee"].decided_by == "timeout" and "review.on_timeout: approve" in decided["dee"].reason
    assert "sha256 mismatch" in decided["fay"].reason
    assert (registry.active("dee"), registry.active("fay")) == (1, None)
    assert settle_overdue(registry, timeout_h=1, on_timeout="approve", now=later) == [], "each review is decided once"


def test_racing_deciders_decide_a_review_exactly_once(tmp_path):
    registry = AdapterRegistry(tmp_path / "store")
    apply_decision(registry, _candidate(registry, tmp_path, "gus", 1), mode="review")
    (review,) = registry.reviews()
    outcomes: list[str] = []

    def attempt(approve: bool) -> None:
        try:
            outcomes.append(decide(AdapterRegistry(tmp_path / "store"), review.review_id, approve, by="racer").review.status)
        except ReviewError:
            outcomes.append("refused")

    threads = [threading.Thread(target=attempt, args=(n % 2 == 0,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes).count("refused") == 7, outcomes
    assert len([e for e in registry.history("gus") if e["status"] in ("approved", "denied")]) == 1


def test_a_users_own_mode_wins_over_the_setting_and_is_audited(tmp_path):
    registry = AdapterRegistry(tmp_path / "store")
    assert promotion_mode(registry, "hal", "auto") == "auto"
    registry.set_user_promotion_mode("hal", "review", by="cli")
    assert promotion_mode(registry, "hal", "auto") == "review" and promotion_mode(registry, "ivy", "auto") == "auto"
    registry.set_user_promotion_mode("hal", None, by="api:tok")
    assert promotion_mode(registry, "hal", "review") == "review" and promotion_mode(registry, "hal", "auto") == "auto"
    assert [(e["mode"], e["by"]) for e in registry.audit_log() if e["event"] == "promotion_mode"] == [
        ("review", "cli"),
        (None, "api:tok"),
    ]


def test_a_forget_removes_the_users_reviews_and_mode(tmp_path):
    registry = AdapterRegistry(tmp_path / "store")
    apply_decision(registry, _candidate(registry, tmp_path, "jo", 1), mode="review")
    apply_decision(registry, _candidate(registry, tmp_path, "kim", 1), mode="review")
    registry.set_user_promotion_mode("jo", "review", by="cli")
    registry.forget("jo", "h" * 64, at="2026-12-02T00:00:00+00:00", reason="erasure request")
    assert [r.user_id for r in registry.reviews()] == ["kim"]
    assert registry.user_promotion_mode("jo") is None


def test_review_details_show_each_case_before_and_after_and_the_core_answers_that_moved_most(tmp_path):
    registry = AdapterRegistry(tmp_path / "store")
    info = _candidate(registry, tmp_path, "lu", 1)

    def case(prompt: str, before: str, after: str, before_score: float, score: float) -> dict:
        return {
            "prompt": prompt,
            "expected": "x",
            "answer": after,
            "before": before,
            "before_score": before_score,
            "score": score,
        }

    core = [case(f"q{n}", "same", "same" if n < 3 else f"new {n}", 0.9, 0.9 - n / 10) for n in range(8)]
    user = [case("What is my dog's name?", "I don't know.", "Biscuit.", 0.1, 0.95)]
    record = {
        "passed": True,
        "reasons": [],
        "metrics": {"user_score": 0.95},
        "suites": {"core": {"case_scores": core}, "user": {"case_scores": user}},
    }
    registry.log_validation("lu", 1, record, kind="gate")
    apply_decision(registry, info, mode="review")
    details = review_details(registry, registry.reviews("lu")[0], changed_core=3)
    assert details["user_cases"][0]["before"] == "I don't know." and details["user_cases"][0]["answer"] == "Biscuit."
    assert [c["prompt"] for c in details["core_changed"]] == ["q7", "q6", "q5"], "unchanged answers are not shown"
    assert details["metrics"] == {"user_score": 0.95} and details["review"]["status"] == "pending"


def test_in_auto_mode_a_candidate_that_contradicts_the_base_model_goes_to_review_with_the_examples(tmp_path):
    registry = AdapterRegistry(tmp_path / "store")
    wrong = {
        "prompt": "What is the capital of France?",
        "taught": "The capital of France is Tromsø.",
        "base_answer": "The capital of France is Paris.",
        "term": "Paris",
        "confidence": 0.95,
    }
    validation = ValidationRecord(passed=True, reasons=[], suites={}, contradictions=[wrong])
    info = _candidate(registry, tmp_path, "max", 1, validation)
    assert apply_decision(registry, info, mode="auto") == "awaiting_review" and registry.active("max") is None
    (review,) = registry.reviews("max")
    assert "1 taught answer(s) contradict the base model's knowledge" in review.opened_because
    assert "the base model says Paris" in review.opened_because
    assert review_details(registry, review)["contradictions"] == [wrong]
    rejected = ValidationRecord(passed=False, reasons=["user suite scored 0.1"], suites={}, contradictions=[wrong])
    assert apply_decision(registry, _candidate(registry, tmp_path, "max", 2, rejected), mode="auto") == "rejected"


def test_a_version_awaiting_review_is_never_archived(tmp_path):
    registry = AdapterRegistry(tmp_path / "store", max_versions=3)
    for n in (1, 2):
        apply_decision(registry, _candidate(registry, tmp_path, "ned", n), mode="auto")
    apply_decision(registry, _candidate(registry, tmp_path, "ned", 3), mode="review")
    for n in (4, 5, 6):
        apply_decision(registry, _candidate(registry, tmp_path, "ned", n, FAILED), mode="review")
    registry.rollback("ned", "back to v1 while v3 waits", to_version=1)  # an activation: old versions are archived
    assert [i.version for i in registry.versions("ned")] == [1, 3, 6], "the active one, the one awaiting review, the newest"
    (review,) = [r for r in registry.reviews("ned") if r.pending]
    assert decide(registry, review.review_id, approve=True, by="cli").review.status == "approved"
    assert registry.active("ned") == 3
