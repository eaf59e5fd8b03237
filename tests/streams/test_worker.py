"""The worker against the real broker: requests, dead letters, dedupe, schedules (SIGKILL: tests/reliability)."""

from __future__ import annotations

import hashlib
import json
import random
import uuid

import pytest

from adaptloop.samples import malformed_messages
from schemas import LifecycleEvent, RetrainCommand
from schemas.dataset import from_jsonl
from tests.support.events import event

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _dataset(handle, uri: str):
    return from_jsonl((handle.storage_root / uri.split(str(handle.storage_root) + "/", 1)[1]).read_bytes())


def test_stream_for_several_users_yields_exactly_the_expected_requests(worker_factory):
    w = worker_factory(min_gap_events=4, streams={"curation": {"paraphrases": 2}})
    # alice: 4 corrections -> crosses the threshold with her 4th gap.
    # bob: 3 corrections -> below it. carol: 2 missed intents with resolutions,
    # 1 without, 1 negative rating -> 4 gaps, 2 examples and the rated answer (for preference training).
    alice = [event("feedback", "alice", n) for n in range(4)]
    bob = [event("feedback", "bob", n) for n in range(3)]
    carol = [event("intent_traces", "carol", n) for n in range(2)]
    carol += [event("intent_traces", "carol", 2, resolution=None)]
    carol += [event("feedback", "carol", 3, kind="rating", rating=-1, correction=None)]
    w.publish(alice + bob + carol)

    w.wait_for(
        lambda: [r for r in w.requests() if r["user_id"] in {"alice", "carol"}] if len(w.requests()) >= 2 else None,
        what="two requests",
    )
    by_user = {r["user_id"]: r for r in w.requests()}
    assert set(by_user) == {"alice", "carol"}, "bob is below the threshold"
    a = by_user["alice"]
    assert a["trigger"] == "threshold"
    # 4 facts x (1 original + 2 template paraphrases + 1 rewording, "What's fact n?") = 16 prompts; of each fact, the
    # rewording (a kind it is then never trained on) is held out.
    assert a["dataset"]["example_counts"] == {"correction": 12}
    assert a["dataset"]["test_count"] == 4
    assert a["lineage"] == [
        {
            "topic": w.topics["feedback"],
            "partition": a["lineage"][0]["partition"],
            "first_offset": a["lineage"][0]["first_offset"],
            "last_offset": a["lineage"][0]["last_offset"],
        }
    ]
    assert a["lineage"][0]["last_offset"] - a["lineage"][0]["first_offset"] >= 3
    train = _dataset(w, a["dataset"]["uri"])
    test = _dataset(w, a["dataset"]["test_uri"])
    assert {e.response for e in train} == {f"Fact {n} is true." for n in range(4)}
    assert {e.response for e in test} == {f"Fact {n} is true." for n in range(4)}
    assert not {e.prompt for e in test} & {e.prompt for e in train}, "held-out prompts are never trained on"
    assert {f"What is fact {n}?" for n in range(4)} <= {e.prompt for e in train}, "originals stay in training"
    assert all(e.weight == 2.0 and e.event_id and e.provenance for e in train)
    c = by_user["carol"]
    assert c["dataset"]["example_counts"] == {"intent": 4, "rating": 1} and c["dataset"]["test_count"] == 2

    # At most one open request: more gaps for alice change nothing until it closes.
    w.publish([event("feedback", "alice", n) for n in range(10, 14)])
    w.wait_for(lambda: w.states().get("alice", {}).get("events_total") == 8, what="alice's 8 events")
    assert len([r for r in w.requests() if r["user_id"] == "alice"]) == 1
    # The trainer finishes: the 4 gaps gathered meanwhile trigger at once, and the
    # new dataset replays the first one (against forgetting).
    w.send(
        "lifecycle",
        "alice",
        LifecycleEvent(event_id="lc1", type="training_completed", user_id="alice", request_id=a["request_id"], version=1),
    )
    second = w.wait_for(
        lambda: [r for r in w.requests() if r["user_id"] == "alice" and r["request_id"] != a["request_id"]],
        what="alice's second request",
    )[0]
    assert second["dataset"]["example_counts"] == {"correction": 12, "replay": 12}
    assert {e.response for e in _dataset(w, second["dataset"]["test_uri"])} == {f"Fact {n} is true." for n in range(10, 14)}


def test_bad_messages_reach_the_dlq_and_good_ones_are_processed(worker_factory):
    w = worker_factory(min_gap_events=1000)
    bad = malformed_messages() + [(b"x" * 70_000, "oversized"), (json.dumps({"a": [[[[[]]]]]}).encode(), "nesting")]
    good = [event("feedback", "dave", n) for n in range(20)]
    raw = []
    rng = random.Random(3)
    for item in good:
        raw.append(("good", item))
        if bad and rng.random() < 0.6:
            raw.append(("bad", bad.pop()))
    raw += [("bad", b) for b in bad]
    for what, item in raw:
        if what == "good":
            w.publish([item])
        else:
            w.publish_raw("feedback", [(b"dave", item[0])])
    n_bad = sum(1 for what, _ in raw if what == "bad")
    letters = w.wait_for(lambda: (lambda got: got if len(got) >= n_bad else None)(w.read("dlq")), what="dead letters")
    assert len(letters) == n_bad
    sent_bad = {hashlib.sha256(item[0]).hexdigest(): item[0] for what, item in raw if what == "bad"}
    for record in letters:
        letter = json.loads(record.value)
        original = sent_bad[letter["value_sha256"]]
        # privacy.dlq_raw is off: a readable preview, the raw bytes only at their source offset
        assert letter.get("value_b64") is None and letter["value_bytes"] == len(original)
        assert letter["preview"] == original[:8000].decode("utf-8", errors="replace")[:2000]
        assert letter["source_topic"] == w.topics["feedback"] and letter["offset"] >= 0 and letter["reason"]
    state = w.wait_for(lambda: w.states().get("dave", {}).get("events_total") == 20 and w.states()["dave"], what="20 good events")
    assert state["gap_totals"]["correction"] == 20


def test_events_published_twice_are_counted_once(worker_factory):
    from confluent_kafka import Producer

    from streams.decoding import partition_of

    w = worker_factory(min_gap_events=1000)
    events = [event("intent_traces", "erin", n) for n in range(10)] + [
        event("feedback", "erin", n, kind="rating", rating=-1, correction=None) for n in range(5)
    ]
    w.publish(events)
    # The second time through another partitioner: every copy lands outside
    # erin's home partition and must be rerouted there, then deduplicated.
    producer = Producer(w.client.librdkafka())
    wrong = (partition_of(b"erin", w.internal_partitions) + 1) % w.internal_partitions
    for kind, data in events:
        producer.produce(w.topics[kind], key=b"erin", value=json.dumps(data).encode(), partition=wrong)
    assert producer.flush(30) == 0
    w.wait_for(lambda: w.states().get("erin", {}).get("events_total") == 15, what="15 events")
    # Give a late double count time to show, then check again.
    w.publish([event("conversations", "erin", 99)])
    state = w.wait_for(lambda: w.states().get("erin", {}).get("events_total") == 16 and w.states()["erin"], what="marker")
    assert state["gap_totals"] == {"missed_intent": 10, "negative_rating": 5, "correction": 0, "concept_gap": 0}


def test_threshold_schedule_fires_only_at_the_threshold(worker_factory):
    w = worker_factory(min_gap_events=3)
    w.publish([event("feedback", "fay", n) for n in range(2)] + [event("conversations", "fay", 50)])
    w.wait_for(lambda: w.states().get("fay", {}).get("events_total") == 3, what="fay's events")
    assert w.requests() == []
    w.publish([event("feedback", "fay", 2)])
    reqs = w.wait_for(lambda: w.requests(), what="threshold request")
    assert [r["trigger"] for r in reqs] == ["threshold"]


def test_nightly_on_demand_and_accuracy_drop(worker_factory):
    w = worker_factory(
        schedule="nightly", min_gap_events=1, streams={"triggers": {"accuracy_min_samples": 10, "accuracy_floor": 0.5}}
    )
    # gus: gaps and examples, but the nightly schedule waits for the tick.
    w.publish([event("feedback", "gus", n) for n in range(5)])
    # hal: mostly happy -> no accuracy drop. ida: mostly unhappy -> accuracy drop.
    happy = [event("intent_traces", "hal", n, status="satisfied", resolution=None) for n in range(12)]
    unhappy = [event("conversations", "ida", 0)] + [
        event("feedback", "ida", n, kind="rating", rating=-1, correction=None) for n in range(1, 12)
    ]
    w.publish(happy + [event("conversations", "hal", 40)] + unhappy)
    reqs = w.wait_for(lambda: w.requests(), what="accuracy-drop request")
    assert [(r["user_id"], r["trigger"]) for r in reqs] == [("ida", "accuracy-drop")]
    w.wait_for(lambda: w.states().get("hal", {}).get("events_total") == 13, what="hal's events")
    assert len(w.requests()) == 1, "no nightly request before the tick, no drop for hal"

    w.tick(at=1_780_100_000.0)
    reqs = w.wait_for(lambda: (lambda rs: rs if len(rs) >= 3 else None)(w.requests()), what="nightly requests")
    assert sorted((r["user_id"], r["trigger"]) for r in reqs) == [
        ("gus", "nightly"),
        ("hal", "nightly"),
        ("ida", "accuracy-drop"),
    ]

    # On demand under the nightly schedule: a retrain command for a user with no open request.
    w.send("commands", "jo", RetrainCommand(command_id=f"cmd-{uuid.uuid4().hex[:6]}", user_id="jo", include_global=True))
    w.publish([event("concept_gaps", "global", 1, related=["Other"])])
    reqs = w.wait_for(lambda: [r for r in w.requests() if r["user_id"] == "jo"], what="on-demand request")
    assert reqs[0]["trigger"] == "on-demand" and reqs[0]["include_global"] is True and reqs[0]["command_id"].startswith("cmd-")


def test_continuous_schedule_is_rate_limited(worker_factory):
    w = worker_factory(schedule="continuous", streams={"triggers": {"continuous_min_interval_s": 3600}})
    w.publish([event("conversations", "kim", 0, rating=1)])
    first = w.wait_for(lambda: w.requests(), what="first continuous request")[0]
    assert first["trigger"] == "continuous"
    w.send(
        "lifecycle",
        "kim",
        LifecycleEvent(event_id="lc-k", type="training_completed", user_id="kim", request_id=first["request_id"]),
    )
    w.publish([event("conversations", "kim", 600, rating=1)])  # 10 minutes later: rate-limited
    w.wait_for(lambda: w.states().get("kim", {}).get("events_total") == 2, what="kim's second event")
    assert len(w.requests()) == 1
    w.publish([event("conversations", "kim", 7200, rating=1)])  # two hours later: fires
    reqs = w.wait_for(lambda: (lambda rs: rs if len(rs) == 2 else None)(w.requests()), what="second continuous request")
    assert reqs[1]["dataset"]["example_counts"]["conversation"] >= 1


def test_an_accuracy_drop_after_a_promotion_sends_a_rollback_command(worker_factory):
    # Rated answers are training data (preference training): the gap threshold is set out of reach, so what the
    # last assertion checks is that the rollback, not an accuracy-drop request, answers the dip.
    w = worker_factory(min_gap_events=100, streams={"triggers": {"accuracy_min_samples": 6, "accuracy_floor": 0.5}})
    w.publish([event("feedback", "kim", n, kind="rating", rating=1, correction=None) for n in range(8)])
    w.wait_for(lambda: w.states().get("kim", {}).get("events_total") == 8, what="kim's happy ratings")
    w.send("lifecycle", "kim", LifecycleEvent(event_id="kim-promoted-4", type="promoted", user_id="kim", version=4))
    w.wait_for(lambda: w.states().get("kim", {}).get("promoted_version") == 4, what="the promotion to be seen")
    w.publish([event("feedback", "kim", n, kind="rating", rating=-1, correction=None, t0=1_780_000_500.0) for n in range(20, 26)])
    commands = w.wait_for(
        lambda: [json.loads(r.value) for r in w.read("commands") if json.loads(r.value)["type"] == "rollback"],
        what="a rollback command",
    )
    assert [(c["user_id"], c["requested_by"]) for c in commands] == [("kim", "streams")]
    assert "after v4 was promoted" in commands[0]["reason"]
    assert not [r for r in w.requests() if r["user_id"] == "kim"], "the rollback answers the dip; no retraining request"


def test_an_unreadable_dataset_is_reported_and_the_worker_keeps_going(worker_factory):
    """Both of the processor's "say so, keep going" paths, through the worker.

    fay's request fails and its dataset file is gone: its examples cannot go
    back to pending. gus's previous dataset is unreadable when his next request
    is snapshotted: it goes without the replay sample. Each is logged, and each
    user's next request is emitted as usual.
    """
    w = worker_factory(min_gap_events=3)
    w.publish([event("feedback", "fay", n) for n in range(3)] + [event("feedback", "gus", n) for n in range(3)])
    first = {
        r["user_id"]: r
        for r in w.wait_for(lambda: (lambda got: got if len(got) == 2 else None)(w.requests()), what="two requests")
    }

    def local(uri: str):
        return w.storage_root / uri.split(str(w.storage_root) + "/", 1)[1]

    local(first["fay"]["dataset"]["uri"]).unlink()
    w.send(
        "lifecycle",
        "fay",
        LifecycleEvent(
            event_id="lc-fay",
            type="training_failed",
            user_id="fay",
            request_id=first["fay"]["request_id"],
            reason="the trainer gave up",
        ),
    )
    local(first["gus"]["dataset"]["uri"]).write_bytes(b"\x00 not a dataset\n")
    w.send(
        "lifecycle",
        "gus",
        LifecycleEvent(
            event_id="lc-gus", type="training_completed", user_id="gus", request_id=first["gus"]["request_id"], version=1
        ),
    )
    w.wait_for(
        lambda: w.states().get("fay", {}).get("open_request") is None and w.states().get("gus", {}).get("open_request") is None,
        what="both requests closed",
    )
    w.publish([event("feedback", "fay", n) for n in range(10, 13)] + [event("feedback", "gus", n) for n in range(10, 13)])
    second = w.wait_for(
        lambda: (
            {r["user_id"]: r for r in w.requests() if r["request_id"] not in {f["request_id"] for f in first.values()}}
            if len(w.requests()) == 4
            else None
        ),
        what="each user's next request",
    )
    assert set(second) == {"fay", "gus"}
    assert second["fay"]["dataset"]["example_counts"] == {"correction": 9}, (
        "nothing came back from the missing file, nothing else lost"
    )
    assert second["gus"]["dataset"]["example_counts"] == {"correction": 9}, "no replay from the unreadable dataset"
    log = w.log_tail(400)
    assert f"could not restore the examples of failed request {first['fay']['request_id']}" in log
    assert "replay pool" in log and "unreadable, snapshotting without it" in log


def test_consent_from_events_and_the_command_line_keeps_a_user_out_of_training(worker_factory):
    """`"consent": "no-train"` events and `adaptloop consent U --no-train` are counted, never trained on; --train undoes it."""
    from tests.support.processes import run_cli

    w = worker_factory(min_gap_events=3)
    bootstrap = {"KAFKA_BOOTSTRAP_SERVERS": w.client.bootstrap_servers}
    w.publish([event("feedback", "noa", n, consent="no-train") for n in range(3)])
    w.wait_for(lambda: w.states().get("noa", {}).get("events_total") == 3, what="three no-train events counted")
    out = run_cli("--config", str(w.config_path), "consent", "noa", "--no-train", env=bootstrap)
    assert out.returncode == 0 and "opted out" in out.stdout, out.stderr
    w.wait_for(lambda: w.states()["noa"].get("training_consent") is False, what="the opt-out applied")
    w.publish([event("feedback", "noa", n) for n in range(3, 6)])
    w.send("commands", "noa", RetrainCommand(command_id="noa-retrain", user_id="noa"))
    skipped = w.wait_for(lambda: [json.loads(r.value) for r in w.read("lifecycle")], what="the retrain answered")
    assert [(e["type"], e["job_id"]) for e in skipped] == [("training_skipped", "noa-retrain")]
    w.wait_for(lambda: w.states()["noa"]["events_total"] == 6, what="the opted-out events counted")
    assert w.requests() == [] and w.states()["noa"]["pending_next"] == w.states()["noa"]["pending_first"]

    out = run_cli("--config", str(w.config_path), "consent", "noa", "--train", env=bootstrap)
    assert out.returncode == 0, out.stderr
    w.wait_for(lambda: w.states()["noa"].get("training_consent") is True, what="the opt-in applied")
    w.publish([event("feedback", "noa", n) for n in range(6, 9)])
    (request,) = w.wait_for(lambda: w.requests(), what="a request once opted in")
    assert {e.response for e in _dataset(w, request["dataset"]["uri"])} == {f"Fact {n} is true." for n in range(6, 9)}
