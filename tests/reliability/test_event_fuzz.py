"""Hostile input events: >= 10,000 of them, made by hypothesis and by mutating valid events, among valid ones.

Through a live worker on the broker: every message the schemas refuse reaches
the dead-letter topic with a reason (and its source offset), every message
they accept is counted for its user, nothing crashes the worker, and its
memory stays bounded while megabytes of junk go through it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from core.errors import InvalidMessage
from schemas.decode import decode
from schemas.events import EVENT_TYPE_BY_INPUT_KIND
from tests.support.events import INPUT_KINDS, event

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

MAX_EVENT_BYTES = 64 * 1024  # the worker's default
VALID, USERS = 2_000, 20
HOSTILE_VALUES = [
    "",
    " ",
    "\x00",
    "\x1b[31mred",
    "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
    "a" * 5000,
    "x" * 70_000,
    "'; DROP TABLE users; --",
    "<script>alert(1)</script>",
    "{{7*7}}",
    "${jndi:ldap://x/a}",
    "../../etc/passwd",
    "%00",
    "\u202etxt.exe",
    "аlice",
    "ａｌｉｃｅ",
    "alice\u200b",
    "ALICE",
    "al ice",
    "alice/..",
    -1,
    0,
    1.5e308,
    float("nan"),
    True,
    None,
    [],
    {},
    [[[[[]]]]],
    {"$ne": None},
    "2026-13-45T99:99:99",
    "1970-01-01T00:00:00",
    "9999-12-31T23:59:59Z",
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


def _collect(strategy, n: int, seed: int) -> list:
    """n values drawn from a hypothesis strategy (its generation phase, without shrinking)."""
    out: list = []

    @settings(
        max_examples=n,
        database=None,
        phases=[Phase.generate],
        derandomize=True,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def draw(value) -> None:
        out.append(value)

    draw()
    random.Random(seed).shuffle(out)
    return out


def _mutants(rng: random.Random, sources: list[tuple[str, dict]]) -> list[tuple[str, bytes]]:
    """Each source event changed once: a field set to a hostile value, dropped, added, or the bytes broken."""
    out = []
    for kind, body in sources:
        body = dict(body)
        how = rng.randrange(7)
        if how == 0:
            body[rng.choice(sorted(body))] = rng.choice(HOSTILE_VALUES)
        elif how == 1:
            body.pop(rng.choice(sorted(body)))
        elif how == 2:
            body[rng.choice(["resolutoin", "admin", "__proto__", "user_id "])] = rng.choice(HOSTILE_VALUES)
        elif how == 3:
            body["user_id"] = rng.choice(
                ["аlice", "ａｌｉｃｅ", "alice\u200b", "al ice", "../alice", "..", "a" * 200, "alice\x00"]
            )
        raw = json.dumps(body, allow_nan=True).encode()
        if how == 4:  # invalid UTF-8 somewhere inside
            at = rng.randrange(len(raw))
            raw = raw[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]) + raw[at:]
        elif how == 5:  # truncated or with flipped bits
            raw = (
                raw[: rng.randrange(len(raw))]
                if rng.random() < 0.5
                else bytes(b ^ (1 << rng.randrange(8)) if rng.random() < 0.02 else b for b in raw)
            )
        elif how == 6:  # deeply nested
            depth = rng.choice([50, 1_000, 100_000])
            raw = raw[:-1] + b', "extra": ' + b"[" * depth + b"]" * depth + b"}"
        out.append((kind, raw))
    return out


def _messages(rng: random.Random) -> tuple[list[tuple[str, bytes | None, bytes]], int]:
    """(kind, key, value) in a shuffled order, and how many are hostile."""
    users = [f"fuzz{i:02d}" for i in range(USERS)]
    valid = [event(rng.choice(INPUT_KINDS), rng.choice(users), n) for n in range(VALID)]
    sources = [event(rng.choice(INPUT_KINDS), rng.choice(users), n) for n in range(VALID, VALID + 5_000)]
    hostile: list[tuple[str, bytes]] = _mutants(rng, sources)
    hostile += [(rng.choice(INPUT_KINDS), json.dumps(v).encode()) for v in _collect(json_values, 3_000, 1)]
    hostile += [(rng.choice(INPUT_KINDS), t.encode("utf-8", "surrogatepass")) for t in _collect(st.text(max_size=200), 1_500, 2)]
    hostile += [(rng.choice(INPUT_KINDS), b) for b in _collect(st.binary(max_size=300), 500, 3)]
    huge = [b"x" * rng.randrange(MAX_EVENT_BYTES, 900_000) for _ in range(40)]  # several MB in all, each refused unread
    hostile += [(rng.choice(INPUT_KINDS), h) for h in huge] + [(rng.choice(INPUT_KINDS), b"") for _ in range(10)]
    out = [(kind, body["user_id"].encode(), json.dumps(body).encode()) for kind, body in valid]
    out += [(kind, rng.choice([None, b"", rng.choice(users).encode(), b"\xff\xfe", b"k" * 1000]), raw) for kind, raw in hostile]
    rng.shuffle(out)
    return out, len(hostile)


def _accepted(kind: str, raw: bytes):
    try:
        return decode(EVENT_TYPE_BY_INPUT_KIND[kind], raw, MAX_EVENT_BYTES)
    except InvalidMessage:
        return None


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_hostile_events_reach_the_dlq_and_valid_ones_are_counted_with_bounded_memory(worker_factory, figures):
    rng = random.Random(909)
    messages, n_hostile = _messages(rng)
    assert n_hostile >= 10_000
    expected: dict[str, set[str]] = defaultdict(set)
    refused: Counter[str] = Counter()
    for kind, _key, raw in messages:
        accepted = _accepted(kind, raw)
        if accepted is None:
            refused[hashlib.sha256(raw).hexdigest()] += 1
        else:
            expected[accepted.user_id].add(accepted.event_id)
    n_refused = sum(refused.values())
    assert n_refused >= 9_000, "the mutations are hostile: most are refused"

    w = worker_factory(min_gap_events=10**6)
    pid = w.procs[-1].pid
    warm = [(k, key, raw) for k, key, raw in messages[:500]]
    for kind in INPUT_KINDS:
        w.publish_raw(kind, [(key, raw) for k, key, raw in warm if k == kind])
    w.wait_for(lambda: len(w.read("dlq")) >= sum(1 for k, _, r in warm if _accepted(k, r) is None), timeout=120, what="warm-up")
    rss_warm, rss_peak = _rss_mb(pid), 0.0
    rest = messages[500:]
    for start in range(0, len(rest), 1_000):
        chunk = rest[start : start + 1_000]
        for kind in INPUT_KINDS:
            w.publish_raw(kind, [(key, raw) for k, key, raw in chunk if k == kind])
        rss_peak = max(rss_peak, _rss_mb(pid))

    def all_dead_lettered():
        nonlocal rss_peak
        rss_peak = max(rss_peak, _rss_mb(pid))
        letters = w.read("dlq")
        return letters if len(letters) >= n_refused else None

    letters = w.wait_for(all_dead_lettered, timeout=300, what=f"{n_refused} dead letters")
    states = w.wait_for(
        lambda: (lambda s: s if all(s.get(u, {}).get("events_total") == len(ids) for u, ids in expected.items()) else None)(
            w.states()
        ),
        timeout=120,
        what="every accepted event counted",
    )
    assert w.procs[-1].poll() is None, "the worker is still running"

    got: Counter[str] = Counter()
    for record in letters:
        letter = json.loads(record.value)
        assert letter["reason"] and letter["offset"] >= 0 and letter["source_topic"] in {w.topics[k] for k in INPUT_KINDS}
        got[letter.get("value_sha256") or hashlib.sha256(base64.b64decode(letter["value_b64"])).hexdigest()] += 1
    assert got == refused, "each refused message dead-lettered exactly once"
    assert set(states) >= set(expected) and sum(len(ids) for ids in expected.values()) >= VALID
    growth = rss_peak - rss_warm
    figures(
        "Bad input",
        "Hostile events (hypothesis + mutations) interleaved with valid ones",
        f"{n_hostile} hostile messages ({sum(len(r) for _, _, r in messages) / 1e6:.0f} MB in all) among {VALID} valid",
        lost=0,
        duplicated=0,
        result=f"all {n_refused} refused ones dead-lettered with a reason, all {sum(len(i) for i in expected.values())} accepted "
        f"ones counted; worker memory {rss_warm:.0f} MB after warm-up, peak +{growth:.0f} MB",
        hostile=n_hostile,
        refused=n_refused,
        rss_warm_mb=round(rss_warm),
        rss_growth_mb=round(growth),
    )
    assert growth < 250, f"worker memory grew by {growth:.0f} MB"
