"""Trainers SIGKILLed mid-training: every request still ends with exactly one version.

One trainer killed 5 times at random points (it resumes from its checkpoint
each time; the test reports the training time that saved), and two trainers
in one group with one of them killed (its users move to the other).
"""

from __future__ import annotations

import json
import random
import re
import time

import pytest

from schemas.training import TrainingExample
from streams.decoding import partition_of
from trainer.registry import AdapterRegistry

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _examples(n: int) -> list[TrainingExample]:
    return [TrainingExample(prompt=f"What is code {i}?", response=f"Code {i} is {i * 7}.", event_id=f"e{i}") for i in range(n)]


def _job_at_least(log: str, share: float) -> bool:
    """Whether the last progress line in `log` shows a job at least `share` done and not finished."""
    steps = re.findall(r"training \S+: step (\d+)/(\d+)", log)
    return bool(steps) and share <= int(steps[-1][0]) / int(steps[-1][1]) < 1


def _outcome(handle, requests) -> tuple[int, int, dict[str, int]]:
    """(requests without exactly one version, extra completion events, versions per request)."""
    registry = AdapterRegistry(handle.store)
    per_request = {
        r.request_id: sum(1 for v in registry.versions(r.user_id) if v.manifest.request_id == r.request_id) for r in requests
    }
    completions = [e for e in handle.lifecycle() if e["type"] == "training_completed"]
    wrong = sum(1 for count in per_request.values() if count != 1)
    return wrong, len(completions) - len({e["request_id"] for e in completions}), per_request


def _all_completed(handle, requests):
    done = {e["request_id"] for e in handle.lifecycle() if e["type"] == "training_completed"}
    return done >= {r.request_id for r in requests}


def test_trainer_sigkilled_five_times_yields_exactly_one_version_per_request(trainer_factory, figures):
    t = trainer_factory(epochs=30, checkpoint_every=5)  # 180 steps a request
    requests = [t.request(f"kay{i}", _examples(12)) for i in range(3)]
    for request in requests:
        t.publish(request)
    checkpoints = t.store / "models/adapters/checkpoints"  # <user hash>/<request_id>/
    rng = random.Random(5)
    resumable_steps = []
    for _ in range(5):
        # A random point of a job (the fault under test), found by the job's progress since the last
        # start, not by the clock: a faster machine would finish the jobs before a timed kill.
        since, share = t.log_path.stat().st_size, rng.uniform(0.1, 0.7)
        t.wait_for(
            lambda since=since, share=share: _job_at_least(t.service.log_since(since), share),
            what=f"a job {share:.0%} done",
            interval=0.05,
        )
        t.procs[-1].kill()
        t.procs[-1].wait(10)
        resumable_steps.append(
            sum(json.loads(p.read_text())["step"] for p in checkpoints.glob("*/*/progress.json") if "." not in p.parent.name)
        )  # not a checkpoint being swapped in
        t.start()
    t.wait_for(lambda: _all_completed(t, requests), timeout=600, what="every request completed")
    wrong, extra_completions, per_request = _outcome(t, requests)
    registry = AdapterRegistry(t.store)
    infos = [registry.find_by_request(r.user_id, r.request_id) for r in requests]
    per_step = [
        i.manifest.metrics.train_seconds / max(1, i.manifest.metrics.steps - i.manifest.resumed_from_step)
        for i in infos
        if i is not None
    ]
    step_s = sum(per_step) / len(per_step)
    saved_s = sum(resumable_steps) * step_s  # each restart skipped the checkpointed steps instead of starting over
    figures(
        "Faults",
        "Trainer SIGKILLed at random points during training and restarted",
        f"5 SIGKILLs over {len(requests)} requests (180 steps each, checkpoint every 5)",
        lost=wrong,
        duplicated=extra_completions,
        result=f"every request ended with exactly one version; restarts resumed {sum(resumable_steps)} checkpointed steps "
        f"(~{saved_s:.0f} s of training not redone)",
        resumed_steps_per_kill=resumable_steps,
        seconds_per_step=round(step_s, 4),
        time_saved_s=round(saved_s, 1),
        versions_per_request=list(per_request.values()),
    )
    assert wrong == 0
    assert sum(resumable_steps) > 0 and any(i.manifest.resumed_from_step > 0 for i in infos)


def test_a_batch_sigkilled_mid_training_resumes_every_user_exactly_once(trainer_factory, figures):
    t = trainer_factory(epochs=15, checkpoint_every=5, batch_users=3, batch_wait_s=120)  # 90 steps a user
    requests = [t.request(f"bat{i}", _examples(12)) for i in range(3)]
    for request in requests:
        t.publish(request)
    t.wait_for(lambda: "training 3 users together" in t.service.log(), what="the batch of three")
    # Killed once every user's job is a third done (by its progress, not by the clock).
    t.wait_for(lambda: _job_at_least(t.service.log(), 0.34), what="the batch a third done", interval=0.05)
    t.procs[-1].kill()
    t.procs[-1].wait(10)
    t.start()
    t.wait_for(lambda: _all_completed(t, requests), timeout=600, what="every request completed")
    wrong, extra_completions, per_request = _outcome(t, requests)
    registry = AdapterRegistry(t.store)
    infos = [registry.find_by_request(r.user_id, r.request_id) for r in requests]
    resumed = [i.manifest.resumed_from_step for i in infos if i is not None]
    figures(
        "Faults",
        "A trainer SIGKILLed while it trained a batch of three users together, then restarted",
        "1 SIGKILL a third into a batch of 3 users (90 steps each, checkpoint every 5)",
        lost=wrong,
        duplicated=extra_completions,
        result=f"each user ended with exactly one version, every one resumed from its own checkpoint (steps {resumed})",
        resumed_from_steps=resumed,
        versions_per_request=list(per_request.values()),
    )
    assert wrong == 0 and extra_completions == 0
    assert len(resumed) == 3 and all(step > 0 for step in resumed), "each user resumed from its checkpoint, none started over"


def test_two_trainers_one_killed_its_users_move_and_complete_once(trainer_factory, figures, tmp_path, request):
    a = trainer_factory(epochs=20, checkpoint_every=5)
    b = a.another(tmp_path / "trainer-b.log")
    request.addfinalizer(b.stop)  # the factory stops only the trainers it made
    b.start()
    # Two users per partition of the 3-partition requests topic.
    users, n = [], 0
    while len(users) < 6:
        name = f"moe{n}"
        if sum(1 for u in users if partition_of(u.encode(), 3) == partition_of(name.encode(), 3)) < 2:
            users.append(name)
        n += 1
    requests = [a.request(user, _examples(12)) for user in users]
    for request in requests:
        a.publish(request)

    def training_now(handle) -> set[str]:
        return set(re.findall(r"training (\S+): step", handle.log_path.read_text(errors="replace")))

    def early_in_a_job(handle) -> str | None:
        """The user whose job `handle` is in the first half of, going by its last progress line."""
        steps = re.findall(r"training (\S+): step (\d+)/(\d+)", handle.log_path.read_text(errors="replace"))
        user, step, total = steps[-1] if steps else (None, 0, 0)
        return user if int(step) <= int(total) // 2 else None

    a.wait_for(lambda: training_now(a) or training_now(b), what="a trainer training")
    # Killed in the first half of a job, so that a job is surely cut short: a
    # trainer caught between jobs, or about to finish one, leaves nothing to move.
    victim, survivor, cut_short = a.wait_for(
        lambda: next(((v, s, u) for v, s in ((a, b), (b, a)) if (u := early_in_a_job(v))), None),
        what="a trainer early in a job",
        interval=0.05,
    )
    victim.procs[-1].kill()
    victim.procs[-1].wait(10)
    killed_at = time.monotonic()
    survivor.wait_for(lambda: _all_completed(survivor, requests), timeout=600, what="every request completed")
    moved = sorted(training_now(survivor) & {r.user_id for r in requests if r.user_id in training_now(victim)})
    wrong, extra_completions, per_request = _outcome(survivor, requests)
    figures(
        "Faults",
        "Two trainers in one group, one SIGKILLed mid-training",
        f"1 SIGKILL, {len(requests)} requests for {len(users)} users",
        lost=wrong,
        duplicated=extra_completions,
        result=f"the killed trainer's users ({', '.join(moved)}) moved to the other; each request completed exactly once",
        moved_users=moved,
        finished_after_kill_s=round(time.monotonic() - killed_at, 1),
        versions_per_request=list(per_request.values()),
    )
    assert wrong == 0 and extra_completions == 0
    assert cut_short in moved, f"the survivor trained {cut_short}, whose job the killed trainer was in the middle of"
