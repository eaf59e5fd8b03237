"""Per-user state, triggers and dataset snapshots: plain functions, no Kafka."""

from __future__ import annotations

from datetime import UTC

import pytest

from core.settings import CurationSettings
from core.storage import ArtifactStore
from schemas.dataset import split_holdout
from schemas.training import Provenance, TrainingExample
from streams.curation import Curated
from streams.dataset import DatasetConfig, build_dataset, lineage, read_examples
from streams.envelope import Envelope
from streams.processor import BatchStats, ProcessorConfig, UserProcessor
from streams.state import MemoryUserLog, OpenRequest, UserState, apply_event, gaps_in_window, pending_examples, prune_gaps
from streams.triggers import TriggerConfig, automatic_trigger, nightly_trigger

pytestmark = pytest.mark.unit

CFG = CurationSettings(paraphrases=2)


_LOGS: dict[int, MemoryUserLog] = {}


def _new_state() -> UserState:
    """A fresh state with its own fresh log (ids of dead objects are reused, so never setdefault)."""
    state = UserState()
    _LOGS[id(state)] = MemoryUserLog()
    return state


def _log(state: UserState) -> MemoryUserLog:
    return _LOGS[id(state)]


def _apply(state, eid, t, curated, **kw):
    return apply_event(state, _log(state), eid, t, curated, CFG, max_pending=kw.get("pending", 100), accuracy_window=5)


def _ex(n: int) -> TrainingExample:
    return TrainingExample(
        prompt=f"Q{n}?",
        response=f"A{n}.",
        source="correction",
        event_id=f"e{n}",
        provenance=Provenance(topic="t", partition=n % 2, offset=n),
    )


def test_duplicate_event_ids_change_nothing():
    state = _new_state()
    assert _apply(state, "e1", 1.0, Curated(examples=(_ex(1),), gap="correction"))
    before = state.model_copy(deep=True)
    assert not _apply(state, "e1", 1.0, Curated(examples=(_ex(1),), gap="correction"))
    assert state == before
    assert state.gap_totals["correction"] == 1 and state.pending_count == 1  # paraphrased at snapshot time


def test_pending_is_bounded_oldest_first():
    state = _new_state()
    for n in range(50):
        _apply(state, f"e{n}", float(n), Curated(examples=(_ex(n),)), pending=12)
    assert state.pending_count == 12 and state.pending_dropped == 50 - 12
    assert [e.event_id for e in pending_examples(state, _log(state))] == [f"e{n}" for n in range(38, 50)]
    assert len(_log(state).examples) == 12, "dropped examples leave the log too"


def test_positive_rating_boosts_the_pending_conversation_example():
    state = _new_state()
    conv = TrainingExample(prompt="Q?", response="A.", source="conversation", weight=1.0)
    other = TrainingExample(prompt="Q?", response="B.", source="correction", weight=1.0)
    _apply(state, "c", 0.0, Curated(examples=(conv, other)))
    _apply(state, "r", 1.0, Curated(outcome=True, boost_prompt="q?"))
    assert [e.weight for e in pending_examples(state, _log(state))] == [1.5, 1.0]


def test_threshold_cooldown_and_open_request():
    cfg = TriggerConfig.from_settings(schedule="threshold", min_gap_events=3, cooldown_s=100, gap_window_s=1000)
    state = _new_state()
    for n in range(2):
        _apply(state, f"e{n}", float(n), Curated(examples=(_ex(n),), gap="correction"))
    assert automatic_trigger(state, 2.0, cfg) is None
    _apply(state, "e2", 2.0, Curated(gap="correction"))
    assert automatic_trigger(state, 2.0, cfg) == "threshold"
    state.last_request_at = 0.0
    assert automatic_trigger(state, 50.0, cfg) is None, "cooldown"
    assert automatic_trigger(state, 150.0, cfg) == "threshold"
    assert automatic_trigger(state, 5000.0, cfg) is None, "gaps outside the window"


def test_a_state_keeps_only_the_gaps_that_can_still_decide_the_threshold():
    """Gaps out of order are kept in time order; the newest min_gap_events decide alone, so the rest go."""
    cfg = TriggerConfig.from_settings(schedule="threshold", min_gap_events=3, cooldown_s=0, gap_window_s=100)
    state = _new_state()
    state.open_request = OpenRequest(request_id="r", at=0.0, trigger="threshold")  # nothing fires while it is out
    for n, t in enumerate([50.0, 10.0, 40.0, 20.0, 60.0, 30.0]):
        _apply(state, f"e{n}", t, Curated(examples=(_ex(n),), gap="correction"))
    assert [t for t, _ in state.gaps] == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    assert gaps_in_window(state, 135.0, 100) == 3, "35 < t"
    prune_gaps(state, 60.0, 100, keep=3)
    assert [t for t, _ in state.gaps] == [40.0, 50.0, 60.0], "bounded, whatever a user sends while a request is out"
    state.open_request = None
    assert automatic_trigger(state, 60.0, cfg) == "threshold"
    prune_gaps(state, 145.0, 100, keep=3)
    assert [t for t, _ in state.gaps] == [50.0, 60.0] and automatic_trigger(state, 145.0, cfg) is None
    reloaded = UserState.load({"gaps": [[30.0, "correction"], [10.0, "correction"]]})
    assert reloaded.gaps == [(10.0, "correction"), (30.0, "correction")], "a state written before is put in order"


def test_accuracy_drop_fires_once_per_dip_and_rearms():
    cfg = TriggerConfig.from_settings(schedule="nightly", accuracy_min_samples=4, accuracy_floor=0.5, cooldown_s=0)
    state = _new_state()
    _apply(state, "x", 0.0, Curated(examples=(_ex(0),)))
    for n in range(4):
        _apply(state, f"b{n}", 1.0, Curated(outcome=False))
    assert automatic_trigger(state, 1.0, cfg) == "accuracy-drop"
    assert automatic_trigger(state, 1.0, cfg) is None, "fires once per dip"
    for n in range(5):
        _apply(state, f"g{n}", 2.0, Curated(outcome=True))
    assert automatic_trigger(state, 2.0, cfg) is None and not state.accuracy_alarm
    for n in range(5):
        _apply(state, f"c{n}", 3.0, Curated(outcome=False))
    assert automatic_trigger(state, 3.0, cfg) == "accuracy-drop"


def test_nightly_needs_new_examples_and_the_nightly_schedule():
    state = _new_state()
    assert nightly_trigger(state, TriggerConfig.from_settings(schedule="nightly")) is None
    _apply(state, "e", 0.0, Curated(examples=(_ex(0),)))
    assert nightly_trigger(state, TriggerConfig.from_settings(schedule="threshold")) is None
    assert nightly_trigger(state, TriggerConfig.from_settings(schedule="nightly")) == "nightly"


def test_holdout_keeps_originals_and_never_trains_on_held_out_prompts():
    from streams.curation import augment

    examples = augment([_ex(n) for n in range(5)], 2, seed=3) + [_ex(9)]  # _ex(9): one prompt only
    train, test = split_holdout(examples, seed=3)
    assert len(test) == 5 and {e.event_id for e in test} == {f"e{n}" for n in range(5)}
    assert {f"Q{n}?" for n in range(5)} <= {e.prompt for e in train}
    assert not {e.prompt for e in test} & {e.prompt for e in train}
    assert split_holdout(examples, seed=3) == (train, test), "deterministic"


def test_build_dataset_mixes_replay_and_global_without_leaking_tests():
    new = [_ex(n) for n in range(3)]
    from streams.curation import augment

    new = augment(new, 1, seed=1)
    replay = [_ex(n) for n in range(10, 20)]
    glob = [TrainingExample(prompt="What is LoRA?", response="Low-rank.", source="global")]
    train, test = build_dataset(
        new,
        replay_pool=replay,
        global_pool=glob,
        include_global=True,
        cfg=DatasetConfig.from_settings(replay_max=4, global_max=5, seed=1),
        user_id="u",
    )
    sources = [e.source for e in train]
    assert sources.count("replay") == 4 and sources.count("global") == 1 and sources.count("correction") == 3
    assert len(test) == 3
    assert lineage(new) == lineage(reversed(new))
    assert [(r.partition, r.first_offset, r.last_offset) for r in lineage(new)] == [(0, 0, 2), (1, 1, 1)]


def test_processor_snapshot_writes_the_seed_layout(tmp_path):
    store = ArtifactStore(str(tmp_path))
    proc = UserProcessor(
        ProcessorConfig.from_settings(triggers=TriggerConfig.from_settings(min_gap_events=2, cooldown_s=0)), store
    )
    state = _new_state()
    envs = [
        Envelope(
            k="event",
            kind="feedback",
            body={
                "event_id": f"f{n}",
                "user_id": "zoe",
                "timestamp": "2026-01-01T00:00:00Z",
                "kind": "correction",
                "query": f"Q{n}?",
                "response": "x",
                "correction": f"A{n}.",
            },
        )
        for n in range(2)
    ]
    log = MemoryUserLog()
    (request,) = proc.handle("zoe", state, log, envs, BatchStats())
    assert (tmp_path / "data/adapter_training/user_zoe_finetune.jsonl").is_file()
    assert read_examples(store, request.dataset.uri)[0].response in {"A0.", "A1."}
    assert request.dataset.uri.endswith(f"{request.dataset.sha256}.jsonl")
    assert state.open_request and state.open_request.request_id == request.request_id and state.pending_count == 0
    assert log.examples == {}, "snapshotted examples leave the log"
    # Same data, same trigger -> same request id (downstream dedupe).
    again = UserProcessor(proc.cfg, store).handle("zoe", UserState(), MemoryUserLog(), envs, BatchStats())[0]
    assert again.request_id == request.request_id


def _rating(user: str, n: int, rating: int, t: float) -> Envelope:
    from datetime import datetime

    at = datetime.fromtimestamp(t, UTC).isoformat()
    return Envelope(
        k="event",
        kind="feedback",
        body={
            "event_id": f"{user}-r{n}",
            "user_id": user,
            "timestamp": at,
            "kind": "rating",
            "query": f"Q{n}?",
            "response": "x",
            "rating": rating,
        },
    )


def _promoted(user: str, version: int, t: float) -> Envelope:
    from datetime import datetime

    at = datetime.fromtimestamp(t, UTC).isoformat()
    return Envelope(k="lifecycle", body={"type": "promoted", "user_id": user, "version": version, "timestamp": at})


def test_an_accuracy_drop_soon_after_a_promotion_rolls_it_back(tmp_path):
    from schemas import RollbackCommand

    triggers = TriggerConfig.from_settings(schedule="nightly", accuracy_min_samples=4, accuracy_floor=0.5, cooldown_s=0)
    proc = UserProcessor(
        ProcessorConfig.from_settings(triggers=triggers, auto_rollback_window_s=3600), ArtifactStore(str(tmp_path))
    )
    state, log, t0 = _new_state(), MemoryUserLog(), 1_780_000_000.0
    # Happy before the promotion; those outcomes do not count for the new version.
    assert proc.handle("pia", state, log, [_rating("pia", n, 1, t0 + n) for n in range(6)], BatchStats()) == []
    assert proc.handle("pia", state, log, [_promoted("pia", 3, t0 + 10)], BatchStats()) == []
    assert state.outcomes == [] and state.promoted_version == 3
    out = proc.handle("pia", state, log, [_rating("pia", 10 + n, -1, t0 + 20 + n) for n in range(4)], BatchStats())
    (command,) = out
    assert isinstance(command, RollbackCommand) and command.user_id == "pia" and command.to_version is None
    assert "after v3 was promoted" in command.reason and command.requested_by == "streams"
    assert state.promoted_version is None and state.accuracy_alarm, "one rollback per promotion, no retraining for this dip"
    # Deterministic id: a replayed batch asks for the same rollback, which the trainer dedupes.
    again = _new_state()
    proc.handle("pia", again, MemoryUserLog(), [_promoted("pia", 3, t0 + 10)], BatchStats())
    assert (
        proc.handle("pia", again, MemoryUserLog(), [_rating("pia", 10 + n, -1, t0 + 20 + n) for n in range(4)], BatchStats())[
            0
        ].command_id
        == command.command_id
    )


def test_no_rollback_outside_the_window_or_when_disabled(tmp_path):
    triggers = TriggerConfig.from_settings(schedule="nightly", accuracy_min_samples=4, accuracy_floor=0.5, cooldown_s=0)
    t0 = 1_780_000_000.0
    for cfg, late in (
        (ProcessorConfig.from_settings(triggers=triggers, auto_rollback_window_s=60), 600),
        (ProcessorConfig.from_settings(triggers=triggers, auto_rollback=False), 1),
    ):
        proc = UserProcessor(cfg, ArtifactStore(str(tmp_path)))
        state, log = _new_state(), MemoryUserLog()
        proc.handle("quo", state, log, [_promoted("quo", 2, t0)], BatchStats())
        out = proc.handle("quo", state, log, [_rating("quo", n, -1, t0 + late + n) for n in range(4)], BatchStats())
        assert not [m for m in out if m.__class__.__name__ == "RollbackCommand"]


def test_marks_a_crash_lost_after_the_state_landed_are_repaired_by_the_next_run(tmp_path):
    """The state was written, its batch's event-id marks were not: the next run rewrites them before anything else."""
    store = ArtifactStore(str(tmp_path))
    config = ProcessorConfig.from_settings(triggers=TriggerConfig.from_settings(min_gap_events=100))
    crashed, log = UserProcessor(config, store), MemoryUserLog()
    state = UserState()
    batch = [_rating("zed", n, 1, 1_780_000_000.0 + n) for n in range(3)]
    crashed.handle("zed", state, log, batch, BatchStats())
    assert state.events_total == 3 and state.batch_ids == ["zed-r0", "zed-r1", "zed-r2"]
    log.seen_ids.clear()  # the marks never reached the broker
    restarted = UserProcessor(config, store)
    restarted.handle("zed", state, log, [_rating("zed", 9, 1, 1_780_000_009.0)], BatchStats())  # another event first
    restarted.handle("zed", state, log, list(reversed(batch)), BatchStats())  # the lost batch again, in another order
    assert state.events_total == 4, "nothing counted twice"
    assert set(log.seen_ids) == {"zed-r0", "zed-r1", "zed-r2", "zed-r9"}
    assert state.batch_ids == [], "this run's own last write: its marks were sent, nothing is carried"


def test_the_processor_stores_redacted_examples_and_counts_them(tmp_path):
    proc = UserProcessor(ProcessorConfig.from_settings(), ArtifactStore(str(tmp_path)))
    body = {"event_id": "p1", "user_id": "yan", "timestamp": "2026-01-01T00:00:00Z", "kind": "correction"}
    body |= {"query": "Where do I send it?", "response": "x", "correction": "To yan@example.org or 192.168.0.12."}
    state, log, stats = _new_state(), MemoryUserLog(), BatchStats()
    proc.handle("yan", state, log, [Envelope(k="event", kind="feedback", body=body)], stats)
    assert {e.response for e in log.examples.values()} == {"To <EMAIL> or <IP>."}
    assert stats.redacted == {"EMAIL": 1, "IP": 1}


def _correction(user: str, n: int, **fields) -> Envelope:
    body = {"event_id": f"{user}-c{n}", "user_id": user, "timestamp": f"2026-01-01T00:00:{n:02d}Z", "kind": "correction"}
    return Envelope(k="event", kind="feedback", body=body | {"query": f"Q{n}?", "response": "x", "correction": f"A{n}."} | fields)


def _consent(user: str, n: int, train: bool) -> Envelope:
    return Envelope(k="command", body={"type": "consent", "command_id": f"{user}-k{n}", "user_id": user, "train": train})


def test_no_train_events_and_an_opted_out_user_are_counted_but_never_trained_on(tmp_path):
    cfg = ProcessorConfig.from_settings(triggers=TriggerConfig.from_settings(min_gap_events=2, cooldown_s=0))
    proc, state, log = UserProcessor(cfg, ArtifactStore(str(tmp_path))), _new_state(), MemoryUserLog()
    stats = BatchStats()
    assert proc.handle("kim", state, log, [_correction("kim", n, consent="no-train") for n in range(3)], stats) == []
    assert state.events_total == 3 and state.pending_count == 0 and sum(state.gap_totals.values()) == 0
    assert stats.not_trained == 3
    # One trainable correction waits; opting out drops it, and what follows is counted only.
    assert proc.handle("kim", state, log, [_correction("kim", 3)], BatchStats()) == []
    assert state.pending_count == 1
    assert proc.handle("kim", state, log, [_consent("kim", 1, False)], BatchStats()) == []
    assert state.pending_count == 0 and log.examples == {} and state.training_consent is False
    assert proc.handle("kim", state, log, [_correction("kim", n) for n in range(4, 8)], BatchStats()) == []
    assert state.events_total == 8 and state.pending_count == 0
    # A retrain meanwhile is answered at once, so whoever waits on it learns why.
    retrain = Envelope(k="command", body={"type": "retrain", "command_id": "kim-r1", "user_id": "kim"})
    (skipped,) = proc.handle("kim", state, log, [retrain], BatchStats())
    assert skipped.type == "training_skipped" and skipped.job_id == "kim-r1" and "opted out" in skipped.reason
    assert proc.handle("kim", state, log, [retrain], BatchStats())[0].event_id == skipped.event_id, "same id on redelivery"
    # Back in: new events train again, and only they.
    assert proc.handle("kim", state, log, [_consent("kim", 2, True)], BatchStats()) == []
    (request,) = proc.handle("kim", state, log, [_correction("kim", n) for n in (8, 9)], BatchStats())
    assert {e.response for e in read_examples(proc.store, request.dataset.uri)} == {"A8.", "A9."}
