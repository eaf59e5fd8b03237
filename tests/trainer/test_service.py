"""`adaptloop trainer` against the real broker with a tiny model: versions, idempotence, SIGTERM (SIGKILL: tests/reliability)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import httpx
import pytest

from core.forgotten import UserHasher
from core.kafka.broker import free_port
from core.storage import ArtifactStore
from schemas.training import TrainingExample
from streams.decoding import partition_of
from tests.support.adapters import manifest, random_adapter
from tests.support.kafka import partitions_per_member, read_topic
from tests.support.prometheus import check_metric_names
from trainer.registry import AdapterRegistry

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _examples(n: int) -> list[TrainingExample]:
    return [TrainingExample(prompt=f"What is code {i}?", response=f"Code {i} is {i * 7}.", event_id=f"e{i}") for i in range(n)]


def _completed(events, request_id):
    return [e for e in events if e["type"] == "training_completed" and e["request_id"] == request_id]


def _decided(events, request_id):
    return [e for e in events if e["type"] in ("promoted", "rejected") and e["request_id"] == request_id]


def test_a_request_becomes_a_version_with_lifecycle_events_and_redelivery_trains_nothing(trainer_factory, tiny_model_dir):
    import torch
    from peft import PeftModel

    from trainer.model import BaseModelRef, load_base

    port = free_port()
    t = trainer_factory(epochs=2, metrics_port=port)
    request = t.request("ana", _examples(6), test=_examples(1))
    t.publish(request)
    t.wait_for(lambda: _decided(t.lifecycle(), request.request_id), what="the gate's decision")
    everything = [e for e in t.lifecycle() if e["request_id"] == request.request_id]
    progress = [e["details"] for e in everything if e["type"] == "training_progress"]
    assert progress[-1] == {"phase": "gating"} and [p["step"] for p in progress[:-1]] == [1, 2, 3, 4, 5, 6], (
        "a tenth of 6 steps: each"
    )
    events = [e for e in everything if e["type"] != "training_progress"]
    assert [e["type"] for e in events] == ["training_started", "training_completed", "validated", "rejected"]
    done = _completed(t.lifecycle(), request.request_id)[0]
    assert done["version"] == 1 and done["metrics"]["steps"] == 6
    validated, rejected = events[2], events[3]
    assert validated["details"]["passed"] is False and {"core", "user"} <= set(validated["details"]["suites"])
    assert "user suite scored" in rejected["reason"], "two epochs on a tiny model teach it nothing"
    assert rejected["metrics"]["user_score"] < 0.7 and "core_score" in rejected["metrics"]

    registry = AdapterRegistry(t.store)
    info = registry.verify("ana", 1)
    assert info.manifest.request_id == request.request_id and info.manifest.dataset.sha256 == request.dataset.sha256
    assert registry.active("ana") is None, "rejected: never active"
    assert [(e["version"], e["status"]) for e in registry.history("ana")][-1] == (1, "rejected")
    (logged,) = registry.validation_results("ana")
    assert logged["passed"] is False and logged["request_id"] == request.request_id and logged["suites"]["user"]["case_scores"]
    model, tokenizer, device = load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids).logits
        after = PeftModel.from_pretrained(model, str(info.path))(ids).logits
    assert not torch.allclose(before, after), "the adapter loads with plain PEFT and changes the model"

    t.publish(request)  # redelivered
    t.wait_for(lambda: len(_decided(t.lifecycle(), request.request_id)) == 2, what="republished result")
    assert [i.version for i in registry.versions("ana")] == [1]
    assert _completed(t.lifecycle(), request.request_id)[1]["details"]["republished"] is True
    assert len(registry.validation_results("ana")) == 1, "the redelivered request was not validated again"

    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'adaptloop_trainer_lifecycle_events_total{type="rejected"} 2.0' in text
    assert "adaptloop_trainer_train_seconds_count 1.0" in text and "adaptloop_trainer_busy 0.0" in text
    assert 'adaptloop_consumer_lag_messages{group="tr-' in text and "ana" not in text
    check_metric_names(text)


def _first_half(handle, user: str) -> bool:
    """Whether the trainer's last progress line for `user` is in the first half of the job."""
    steps = re.findall(rf"training {user}: step (\d+)/(\d+)", handle.service.log())
    return bool(steps) and int(steps[-1][0]) <= int(steps[-1][1]) // 2


def test_a_job_whose_user_is_forgotten_meanwhile_leaves_nothing_behind(trainer_factory):
    """`adaptloop forget` marks the user before it deletes anything: the job in flight ends as a skip at its
    registration, with no version, no checkpoint; the same request delivered again is skipped at once."""
    import time

    from core.forgotten import ForgetMarker, ForgetMarkers

    t = trainer_factory(epochs=20, checkpoint_every=5, early_stopping=False, max_train_seconds=0)
    request = t.request("fay", _examples(12))
    t.publish(request)
    t.wait_for(lambda: _first_half(t, "fay"), what="the job in its first half", interval=0.05)
    store = ArtifactStore(str(t.store))
    user_hash = UserHasher.for_store(store)("fay")
    ForgetMarkers(store).write(ForgetMarker(user_hash=user_hash, at=time.time(), reason="erasure request"))

    def skipped() -> list[dict]:
        return [e for e in t.lifecycle() if e["type"] == "training_skipped" and e["request_id"] == request.request_id]

    (event,) = t.wait_for(skipped, what="the job dropped")
    assert "forgotten" in event["reason"]
    assert AdapterRegistry(t.store).versions("fay") == [] and not _completed(t.lifecycle(), request.request_id)
    assert not (t.store / "models/adapters/checkpoints" / user_hash).exists() or not any(
        (t.store / "models/adapters/checkpoints" / user_hash).iterdir()
    ), "no checkpoint"
    t.publish(request)  # delivered again
    t.wait_for(lambda: len(skipped()) == 2, what="the redelivered request skipped at once")
    assert AdapterRegistry(t.store).versions("fay") == []


def test_sigterm_checkpoints_the_job_and_leaves_without_committing(trainer_factory):
    # 120 steps with no early stop and no time budget: a progress line every 12 steps, so the job is
    # seen in its first half at least 60 steps before it could end, on a machine of any speed.
    t = trainer_factory(epochs=20, checkpoint_every=1000, early_stopping=False, max_train_seconds=0)
    request = t.request("dee", _examples(12))
    t.publish(request)
    t.wait_for(lambda: _first_half(t, "dee"), what="the job in its first half", interval=0.05)
    t.procs[-1].send_signal(signal.SIGTERM)
    assert t.procs[-1].wait(60) == 0
    checkpoint = (
        t.store / "models/adapters/checkpoints" / UserHasher.for_store(ArtifactStore(str(t.store)))("dee") / request.request_id
    )
    assert (checkpoint / "progress.json").is_file(), "SIGTERM checkpoints the running job"
    step = json.loads((checkpoint / "progress.json").read_text())["step"]
    assert 0 < step < 120, "checkpointed mid-way on SIGTERM (checkpoint_every alone would not have)"
    assert not _completed(t.lifecycle(), request.request_id)
    t.start()  # the uncommitted request comes back and resumes
    t.wait_for(lambda: _completed(t.lifecycle(), request.request_id), what="completion after SIGTERM")
    (info,) = AdapterRegistry(t.store).versions("dee")
    assert info.manifest.resumed_from_step == step
    assert not checkpoint.exists(), "the checkpoint goes once its version is registered"


def test_two_trainers_split_eight_requests_evenly(trainer_factory, tmp_path, request):
    a = trainer_factory(start=False, epochs=1, request_partitions=4)
    b = a.another(tmp_path / "trainer-b.log")
    request.addfinalizer(b.stop)  # the factory stops only the trainers it made
    starts = [(t, t.service.launch()) for t in (a, b)]  # side by side: a start is mostly imports, one core each
    for t, since in starts:
        t.service.wait_ready(since)
    # Each group balances its own topic: two request partitions each (one group on both topics
    # balanced their sum, so one trainer could hold every request partition).
    a.wait_for(
        lambda: partitions_per_member(a.client, a.group_id, a.topics["training_requests"]) == [2, 2],
        what="two request partitions for each trainer",
    )
    users: list[str] = []  # two users per partition
    for n in range(100):
        name = f"eve{n}"
        if sum(1 for u in users if partition_of(u.encode(), 4) == partition_of(name.encode(), 4)) < 2:
            users.append(name)
    requests = [a.request(user, _examples(2)) for user in users[:8]]
    for r in requests:
        a.publish(r)
    a.wait_for(
        lambda: (
            {e["request_id"] for e in a.lifecycle() if e["type"] in ("promoted", "rejected")} >= {r.request_id for r in requests}
        ),
        timeout=600,
        what="a verdict for all eight requests",
    )
    trained = [re.findall(r"request \S+ -> (\S+) v\d+", t.log_path.read_text(errors="replace")) for t in (a, b)]
    assert sorted(trained[0] + trained[1]) == sorted(users[:8]), "each request trained once"
    assert min(len(trained[0]), len(trained[1])) >= 3, f"each trainer takes its share: {trained}"


def test_waiting_users_are_trained_together_in_one_batch(trainer_factory):
    t = trainer_factory(epochs=2, batch_users=3, batch_wait_s=120)  # the batch starts when full, however slow the machine
    requests = [t.request(user, _examples(4), test=_examples(1)) for user in ("una", "uno", "ute")]
    for r in requests:
        t.publish(r)
    t.wait_for(lambda: all(_decided(t.lifecycle(), r.request_id) for r in requests), what="a verdict for each user")
    assert "training 3 users together" in t.service.log()
    registry = AdapterRegistry(t.store)
    for r in requests:
        (info,) = registry.versions(r.user_id)
        assert info.manifest.request_id == r.request_id and info.manifest.metrics.batch_users == 3
        kinds = [e["type"] for e in t.lifecycle() if e["request_id"] == r.request_id and e["type"] != "training_progress"]
        assert kinds[:3] == ["training_started", "training_completed", "validated"] and len(kinds) == 4


def test_a_user_never_comes_twice_into_one_batch(trainer_factory):
    t = trainer_factory(epochs=1, batch_users=3, batch_wait_s=1)
    first = t.request("una", _examples(2))
    second = t.request("una", _examples(3))  # same user, same partition: read after the first
    other = t.request("uno", _examples(2))
    for r in (first, other, second):
        t.publish(r)
    t.wait_for(lambda: all(_completed(t.lifecycle(), r.request_id) for r in (first, second, other)), what="three versions")
    versions = AdapterRegistry(t.store).versions("una")
    assert [(v.version, v.manifest.request_id) for v in versions] == [(1, first.request_id), (2, second.request_id)]


def test_bad_requests_are_dead_lettered_and_a_tampered_dataset_fails_clearly(trainer_factory):
    t = trainer_factory(epochs=1)
    t.publish(b"{not a request")
    request = t.request("cy", _examples(2))
    tampered = request.model_copy(update={"dataset": request.dataset.model_copy(update={"sha256": "0" * 64})})
    t.publish(tampered)
    failed = t.wait_for(lambda: [e for e in t.lifecycle() if e["type"] == "training_failed"], what="training_failed")
    assert "sha256" in failed[0]["reason"]
    letters = read_topic(t.client, t.topics["dlq"])  # sent before the next request was read
    assert len(letters) == 1 and "not JSON" in json.loads(letters[0].value)["reason"]
    assert AdapterRegistry(t.store).versions("cy") == []


def _answers(events, command_id):
    return [e for e in events if e.get("job_id") == command_id]


def test_rollback_and_validate_commands_through_kafka(trainer_factory, tiny_model_dir):
    from core.kafka.io import produce
    from schemas import RollbackCommand, ValidateCommand
    from trainer.model import BaseModelRef, load_base

    t = trainer_factory(start=False)
    registry = AdapterRegistry(t.store)
    model, _tokenizer, _device = load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")
    for version in (1, 2):
        adapter = random_adapter(model, t.store.parent / f"adapter{version}", seed=version)
        registry.register("rho", adapter, manifest(request_id=f"r{version}", held_out=[{"prompt": "hi", "expected": "hello"}]))
        registry.activate("rho", version, reason="setup")
    t.start()

    def send(command) -> dict:
        produce(t.client, t.topics["commands"], [(command.user_id, command.to_bytes())])
        return t.wait_for(lambda: _answers(t.lifecycle(), command.command_id), what=f"answer to {command.type}")[0]

    back = RollbackCommand(command_id="rb-1", user_id="rho", reason="complaints")
    answer = send(back)
    assert (answer["type"], answer["version"], answer["previous_version"]) == ("rolled_back", 1, 2)
    assert registry.active("rho") == 1 and registry.rollback_log("rho")[-1]["command_id"] == "rb-1"
    produce(t.client, t.topics["commands"], [("rho", back.to_bytes())])  # redelivered: no second rollback
    t.wait_for(lambda: len(_answers(t.lifecycle(), "rb-1")) == 2, what="the republished answer")
    assert len(registry.rollback_log("rho")) == 1 and registry.active("rho") == 1

    base = send(RollbackCommand(command_id="rb-2", user_id="rho", reason="again"))
    assert (base["type"], base.get("version"), base["previous_version"]) == ("rolled_back", None, 1), "past v1: the base model"
    assert registry.active("rho") is None
    nothing = send(RollbackCommand(command_id="rb-3", user_id="rho", reason="and again"))
    assert nothing["type"] == "command_failed" and "no active adapter" in nothing["reason"]
    assert registry.active("rho") is None

    # The CLI sends the same command and waits for its outcome.
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=t.client.bootstrap_servers)
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "adaptloop.cli",
            "--config",
            str(t.config),
            "rollback",
            "--user-id",
            "rho",
            "--reason",
            "v2 was fine",
            "--to-version",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert cli.returncode == 0 and "base model -> v2 active" in cli.stdout, cli.stderr
    assert registry.active("rho") == 2

    validated = send(ValidateCommand(command_id="va-1", user_id="rho", version=1, baseline_version=2))
    assert validated["type"] == "validated" and validated["version"] == 1
    assert validated["details"]["passed"] is False and "core" in validated["details"]["suites"]
    assert registry.active("rho") == 2, "validate reports; it never promotes"
    assert [r["job_id"] for r in registry.validation_results("rho")] == ["va-1"]

    (registry.version_dir("rho", 1) / "adapter_model.safetensors").write_bytes(b"tampered")
    tampered = send(ValidateCommand(command_id="va-2", user_id="rho", version=1))
    assert tampered["details"]["passed"] is False and "sha256 mismatch" in tampered["reason"]


def test_a_request_with_nothing_new_is_skipped_before_any_training(trainer_factory):
    t = trainer_factory(epochs=2)

    def answers(request) -> list[dict]:
        return [e for e in t.lifecycle() if e["request_id"] == request.request_id]

    nothing = t.request("nel", [TrainingExample(prompt="What is LoRA?", response="Low-rank adaptation.", source="global")])
    t.publish(nothing)
    (skip,) = t.wait_for(lambda: answers(nothing), what="the answer to a request with no examples")
    assert (skip["type"], skip["reason"]) == ("training_skipped", "no examples")
    real = t.request("nel", _examples(4), test=_examples(1))
    t.publish(real)
    t.wait_for(lambda: _decided(t.lifecycle(), real.request_id), what="the real request's verdict")
    replayed = t.request("nel", [e.model_copy(update={"source": "replay"}) for e in _examples(4)])
    t.publish(replayed)
    (again,) = t.wait_for(lambda: answers(replayed), what="the answer to a request with nothing new")
    assert (again["type"], again["reason"]) == ("training_skipped", "nothing new since v1")
    assert [i.version for i in AdapterRegistry(t.store).versions("nel")] == [1], "no version registered, no number used"
    assert [e["type"] for e in answers(real)][:2] == ["training_started", "training_progress"], "only the real one trained"


def test_a_ratings_only_user_reaches_a_request_trains_with_preference_and_is_judged_on_it(worker_factory, trainer_factory):
    """Thumbs only, no correction: the negative ratings reach the gap threshold, the rated answers make the dataset,
    the trainer trains them with the preference objective, and the gate reports its preference suite."""
    from schemas.dataset import from_jsonl
    from tests.support.events import event

    w = worker_factory(min_gap_events=4)
    liked = [
        event("feedback", "rae", n, kind="rating", rating=1, correction=None, query=f"How far is town {n}?", response=f"{n} km.")
        for n in range(6)
    ]
    long_answer = "Well, that depends on the road you take, but it is roughly {} km away."
    disliked = [
        event(
            "feedback",
            "rae",
            n,
            kind="rating",
            rating=-1,
            correction=None,
            query=f"How far is town {n}?",
            response=long_answer.format(n),
        )
        for n in range(6, 10)
    ]
    w.publish(liked + disliked)
    (request,) = w.wait_for(lambda: [r for r in w.requests() if r["user_id"] == "rae"] or None, what="rae's request")
    assert request["dataset"]["example_counts"] == {"rating": 8} and request["dataset"]["test_count"] == 2

    def read(uri: str):
        return from_jsonl((w.storage_root / uri.split(str(w.storage_root) + "/", 1)[1]).read_bytes())

    train, test = read(request["dataset"]["uri"]), read(request["dataset"]["test_uri"])
    assert sorted(e.rating for e in test) == [-1.0, 1.0] and all(e.source == "rating" for e in train + test)

    t = trainer_factory(epochs=2)
    job = t.request("rae", train, test)
    t.publish(job)
    t.wait_for(lambda: _decided(t.lifecycle(), job.request_id), what="the gate's decision")
    (validated,) = [e for e in t.lifecycle() if e["type"] == "validated" and e["request_id"] == job.request_id]
    preference = validated["details"]["suites"]["preference"]
    assert preference["threshold"] == 0.6 and 0 <= preference["score"] <= 1
    assert _completed(t.lifecycle(), job.request_id)[0]["metrics"]["preference_examples"] == 8
    (decided,) = _decided(t.lifecycle(), job.request_id)
    assert decided["type"] == ("promoted" if validated["details"]["passed"] else "rejected")
    assert decided["type"] == "promoted" or "no user-specific test cases" not in decided["reason"], "rated pairs are its tests"
    assert "user_score" not in decided["metrics"], "no fact was taught: no user score to show"
