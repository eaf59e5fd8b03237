"""Privacy against a real broker and worker: personal data is never stored, a forgotten user leaves no trace.

The unit-level checks (the redactor's 1,000 hypothesis cases, the tables'
forget, the store's forget) are in tests/core, tests/streams and
tests/privacy; these two put the whole worker through it and record the
figures for docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import random
import re
import time
import uuid
from collections import Counter

import pytest

from core.settings import WORKER_TABLES, changelog_topic, load_settings, worker_data_dir
from tests.support.events import event
from tests.support.kafka import read_topic
from tests.support.pii import make_pii, sentence
from tests.support.processes import run_cli

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_personal_data_never_reaches_storage_changelogs_or_logs(worker_factory, figures):
    """1,000 generated emails, phone numbers, cards, IBANs and IPs in corrections: stored only as placeholders."""
    w = worker_factory(min_gap_events=25)
    rng = random.Random(20261201)
    cases: list[tuple[str, str]] = []
    events = []
    for u in range(10):
        for n in range(50):
            (k1, v1), (k2, v2) = make_pii(rng), make_pii(rng)
            cases += [(k1, v1), (k2, v2)]
            query, correction = sentence(rng, v1) + "?", sentence(rng, v2)
            events.append(event("feedback", f"pii{u}", n, query=query, correction=correction))
    bad = [b'{"event_id": "bad-%d", "user_id": "pii0", "query": "%s"}' % (n, v.encode()) for n, (_k, v) in enumerate(cases[:20])]
    w.publish(events)
    w.publish_raw("feedback", [(b"pii0", b) for b in bad])
    w.wait_for(lambda: len(w.read("dlq")) == len(bad), what="the dead letters")
    w.wait_for(lambda: len(w.requests()) == 10, what="a request per user")
    w.wait_for(lambda: all(s.get("events_total") == 50 for s in w.states().values()), what="every event counted")
    assert len(cases) == 1000

    found = re.compile("|".join(sorted((re.escape(v) for _k, v in cases), key=len, reverse=True)).encode())
    places = {"worker log": w.log_path.read_bytes()}
    data_dir = worker_data_dir(load_settings(w.config_path))
    for root in (w.storage_root, data_dir):
        for path in (p for p in root.rglob("*") if p.is_file()):
            places[str(path)] = path.read_bytes()
    outputs = [changelog_topic(w.app_id, t) for t in ("users", "seen", "examples")]
    outputs += [w.topics["dlq"], w.topics["training_requests"], f"{w.app_id}-users"]
    for topic in outputs:
        places[topic] = b"\n".join((r.key or b"") + b" " + (r.value or b"") for r in read_topic(w.client, topic))
    leaks = {where: found.findall(data)[:3] for where, data in places.items() if found.search(data)}
    assert leaks == {}, f"personal data stored: {leaks}"

    datasets = b"".join(data for where, data in places.items() if where.endswith(".jsonl"))
    assert all(f"<{kind}>".encode() in datasets for kind in ("EMAIL", "PHONE", "CARD", "IBAN", "IP"))
    letter = json.loads(w.read("dlq")[0].value)
    assert re.search(r"<(EMAIL|PHONE|CARD|IBAN|IP)>", letter["preview"]) and letter.get("value_b64") is None
    kinds = Counter(kind for kind, _value in cases)
    figures(
        "Privacy",
        "Personal data in corrections and dead letters (a real worker and broker)",
        f"{len(cases)} generated items ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}) in 500 corrections "
        f"of 10 users, {len(bad)} of them also in malformed messages",
        lost=None,
        duplicated=None,
        result=f"0 found in {len(places)} places (every file under the storage root and the worker's local dir, its "
        "changelog, request, internal and DLQ topics, its log); every placeholder type in the datasets",
        items=len(cases),
        places=len(places),
        found=0,
        kinds=dict(kinds),
    )


def test_a_forgotten_user_leaves_no_trace_in_the_changelogs_and_old_events_build_nothing_again(worker_factory, tmp_path, figures):
    """`adaptloop forget`: the worker drops the user and purges its changelogs; a restart, the old events
    delivered again and a replay from the beginning bring nothing back; a new event starts a new history."""
    w = worker_factory(min_gap_events=100)
    user = "zelda-7731"
    old = [event("feedback", user, n, query=f"Where did zelda hide key {n}?") for n in range(6)]
    w.publish(old + [event("feedback", "olga", n) for n in range(3)])
    w.wait_for(
        lambda: w.states().get(user, {}).get("events_total") == 6 and w.states().get("olga", {}).get("events_total") == 3,
        what="both users counted",
    )
    env = {"KAFKA_BOOTSTRAP_SERVERS": w.client.bootstrap_servers}
    done = run_cli("--config", str(w.config_path), "forget", user, "--reason", "erasure request", env=env)
    assert done.returncode == 0 and "forgotten at" in done.stdout, done.stderr

    changelogs = [changelog_topic(w.app_id, t) for t in WORKER_TABLES]

    def traces() -> list[str]:
        return [t for t in changelogs for r in read_topic(w.client, t) if b"zelda" in (r.key or b"") + (r.value or b"")]

    w.wait_for(lambda: not traces(), what="no record of the user left in any changelog")
    scanned = sum(len(read_topic(w.client, t)) for t in changelogs)
    assert w.states()["olga"]["events_total"] == 3, "another user's state survives the purge"
    data_dir = worker_data_dir(load_settings(w.config_path))
    files = [p for root in (w.storage_root, data_dir) for p in root.rglob("*") if p.is_file()]
    assert [str(p) for p in files if user.encode() in p.read_bytes()] == [], "files naming the user"

    w.stop()
    w.start()  # the tables restored from the purged changelogs
    w.publish(old)  # upstream delivers the old events again
    w.publish([event("feedback", user, 0, t0=time.time() + 60)])  # after them, in the same partition: a new event
    w.wait_for(lambda: w.states().get(user, {}).get("events_total") == 1, what="a new history of one event")
    assert w.states()["olga"]["events_total"] == 3

    app = f"{w.app_id}-replay-{uuid.uuid4().hex[:4]}"
    run_cli(
        "--config",
        str(w.config_path),
        "replay",
        "--from",
        "2020-01-01T00:00:00Z",
        "--app-id",
        app,
        "--out",
        str(tmp_path / "r"),
        env=env,
    )
    rebuilt = {r.key: json.loads(r.value) for r in read_topic(w.client, changelog_topic(app, "users")) if r.value}
    assert rebuilt[user.encode()]["events_total"] == 1, "the replay ignores the events from before the forget"
    assert rebuilt[b"olga"]["events_total"] == 3
    # Without the commands topic (its retention may have dropped the forget command), the forgotten
    # topic alone keeps the old events out: 1 new event of the user and olga's 3 are all that count.
    inputs = ("--topics", "feedback", "--out", str(tmp_path / "inputs-only"))
    run_cli("--config", str(w.config_path), "replay", "--from", "2020-01-01T00:00:00Z", *inputs, env=env)
    assert json.loads((tmp_path / "inputs-only/replay.json").read_text())["events"] == 4
    figures(
        "Privacy",
        "Forget a user, then restart the worker, deliver the old events again and replay from the beginning",
        f"{len(old)} events of the user and 3 of another; `adaptloop forget`; a restart; the {len(old)} events again; "
        "two replays (all topics; inputs only)",
        lost=None,
        duplicated=None,
        result=f"0 records naming the user among the {scanned} left in the three changelogs, 0 of {len(files)} files; "
        "nothing rebuilt from the old events (a new event after the forget: a history of 1); another user's state intact",
        changelog_records_scanned=scanned,
        files_scanned=len(files),
        found=0,
    )
