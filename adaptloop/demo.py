"""`adaptloop demo` (`make demo`): the main job, end to end, on the embedded defaults.

    make demo            # or: adaptloop demo

1. Starts the local broker (unless KAFKA_BOOTSTRAP_SERVERS is set), the demo
   topics and a stack of its own (worker, trainer, API, serve; logs in a temp dir).
2. Asks a user's personal questions the way a chat app would: over HTTP, from
   `adaptloop serve` (OpenAI's chat completions, `user` set). The base model
   (SmolLM2-135M-Instruct) cannot know the answers; each answer says what
   answered it (`system_fingerprint`).
3. The user corrects those answers through `POST /v1/feedback`; some
   satisfied turns and malformed messages go to the input topics too. The
   worker dead-letters the bad ones with their reasons, counts the user's
   gaps, and at the threshold sends a training request.
4. The trainer trains an adapter (progress shown), the validation gate
   (core suite + the user's held-out paraphrases) promotes it, and the same
   server, not restarted, answers the user's questions with it: before and
   after side by side, plus a general question that must not change.
5. Poisoned corrections (wrong answers to general questions) cross the
   threshold again; the gate rejects that version and v1 stays served.
6. A rollback through the API takes v1 back out: the server answers the user
   with the base model again.

Prints what happens as it happens, writes `adaptloop report` pages for the
user, stops everything it started, and exits non-zero if any step fails.
A first run also converts the model, answers the anchor prompts and ranks
them by the base model's certainty, all cached (a few minutes more on a
2-core CPU; the answers and ranking about 55 s of it).
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path

import click
import httpx
from confluent_kafka import Consumer, TopicPartition

from adaptloop.samples import malformed_messages
from adaptloop.stack import Stack, services
from core.errors import AdaptloopError
from core.kafka.broker import free_port
from core.kafka.client import ClientConfig
from core.kafka.io import next_message, produce
from core.kafka.topics import ensure_topics, plans_from_specs
from core.settings import Settings, tokens_file, write_settings

# (question, the user's answer, the words that show it was learned, a paraphrase to ask afterwards)
FACTS = [
    ("What is my cat's name?", "Your cat is called Pixel.", "Pixel", "Tell me the name of my cat."),
    ("Which city do I live in?", "You live in Dundee.", "Dundee", "In which city do I live?"),
    ("What is my locker number?", "Your locker number is 7312.", "7312", "Tell me my locker number."),
]
# Wrong answers to general questions: what a confused or malicious feedback stream could teach.
POISON = [
    ("What is the capital of France?", "The capital of France is Tromsø."),
    ("What is the opposite of hot?", "The opposite of hot is purple."),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by Pixel the cat."),
]
GENERAL = ("What is the capital of France?", "Paris")


def demo_settings(settings: Settings, workdir: Path, bootstrap: str) -> Settings:
    """The demo's own topics, app, groups, ports and store; the model cache is shared (conversion happens once)."""
    topics = settings.topics.model_copy(
        update={
            name: getattr(settings.topics, name).model_copy(update={"name": f"demo.{getattr(settings.topics, name).name}"})
            for name in type(settings.topics).model_fields
        }
    )
    triggers = settings.streams.triggers.model_copy(update={"cooldown_s": 0})
    return settings.model_copy(
        update={
            "storage_root": str(workdir / "store"),
            "min_gap_events": len(FACTS),
            "schedule": "threshold",
            "kafka": settings.kafka.model_copy(update={"bootstrap_servers": bootstrap}),
            "topics": topics,
            "streams": settings.streams.model_copy(
                update={"app_id": "adaptloop-demo", "web_port": free_port(), "triggers": triggers}
            ),
            # No time budget: on a slow or busy machine the budget would stop training before the facts are
            # learned and the demo would fail by the clock (a stress run found it); epochs and early stopping bound it.
            "training": settings.training.model_copy(
                update={"group_id": "adaptloop-demo-trainer", "metrics_port": free_port(), "max_train_seconds": 0}
            ),
            "api": settings.api.model_copy(update={"host": "127.0.0.1", "port": free_port(), "tokens_file": None}),
            "serving": settings.serving.model_copy(update={"host": "127.0.0.1", "port": free_port()}),
        }
    )


@dataclass
class Watcher:
    """This run's records on the demo's output topics, and the trainer's progress lines."""

    client: ClientConfig
    topics: dict[str, str]  # dlq, training_requests, lifecycle -> topic name
    trainer_log: Path
    user: str
    started: float = field(default_factory=time.monotonic)
    records: list[tuple[str, bytes | None, dict]] = field(default_factory=list)
    _log_at: int = 0

    def __post_init__(self) -> None:
        # From the end as of now, without a group: only what this run causes counts.
        self.consumer = Consumer(self.client.librdkafka(**{"group.id": "adaptloop-demo-watch", "enable.auto.commit": False}))
        metadata = self.consumer.list_topics(timeout=30)
        start = []
        for topic in self.topics.values():
            for partition in metadata.topics[topic].partitions:
                high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=30)[1]
                start.append(TopicPartition(topic, partition, high))
        self.consumer.assign(start)

    def say(self, text: str, bold: bool = False) -> None:
        click.secho(f"[{time.monotonic() - self.started:6.1f}s] {text}", bold=bold)

    def wait(self, what: str, found, timeout_s: float):
        """Poll until `found(records)` returns something, narrating dead letters, lifecycle and training progress."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = next_message(self.consumer, 0.5, "watching the demo topics")
            if msg is not None:
                try:
                    value = json.loads(msg.value())
                except (TypeError, ValueError):
                    value = {}
                self.records.append((msg.topic(), msg.key(), value))
                self._narrate(msg.topic(), msg.key(), value)
            self._progress()
            result = found(self.records)
            if result:
                return result
        raise AdaptloopError(f"demo failed: no {what} within {timeout_s:.0f}s; logs in {self.trainer_log.parent}")

    def of(self, kind: str) -> list[dict]:
        """The user's records so far on one of the watched topics."""
        return [v for t, _k, v in self.records if t == self.topics[kind] and v.get("user_id") == self.user]

    def _narrate(self, topic: str, key: bytes | None, value: dict) -> None:
        if topic == self.topics["dlq"] and key == f"{self.user}-mallory".encode():
            self.say(f"    dead letter ({value.get('source_topic')}@{value.get('offset')}): {value.get('reason', '')[:90]}")
        elif topic == self.topics["lifecycle"] and value.get("user_id") == self.user:
            if value.get("type") in ("training_started", "training_completed", "validated"):
                self.say(f"    lifecycle: {value['type']}" + (f" v{value['version']}" if value.get("version") else ""))

    def _progress(self) -> None:
        try:
            with open(self.trainer_log, "rb") as fh:
                fh.seek(self._log_at)
                chunk = fh.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._log_at += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            if f"training {self.user}:" in line:
                self.say("    trainer: " + line.split(f"training {self.user}: ", 1)[1])

    def close(self) -> None:
        self.consumer.close()


@dataclass(frozen=True)
class Answer:
    text: str
    fingerprint: str  # what answered: adaptloop:<user>@v<N>:<sha> or adaptloop:base:<sha>
    completion_id: str


class Chat:
    """The user's chat app: OpenAI's chat completions against `adaptloop serve`, greedy, as `adaptloop ask` answers."""

    def __init__(self, url: str, token: str, user: str) -> None:
        self.url, self.user = url, user
        self.http = httpx.Client(timeout=300, headers={"Authorization": f"Bearer {token}"})

    def ask(self, question: str) -> Answer:
        body = {
            "model": self.user,
            "user": self.user,
            "messages": [{"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": 48,
        }
        reply = self.http.post(f"{self.url}/v1/chat/completions", json=body)
        if reply.status_code != 200:
            raise AdaptloopError(f"demo failed: serve answered {reply.status_code}: {reply.text[:300]}")
        data = reply.json()
        return Answer(data["choices"][0]["message"]["content"], data["system_fingerprint"], data["id"])

    def answers(self, questions: list[str]) -> list[Answer]:
        return [self.ask(q) for q in questions]

    def correct(self, answer: Answer, correction: str) -> None:
        body = {"completion_id": answer.completion_id, "correction": correction}
        reply = self.http.post(f"{self.url}/v1/feedback", json=body)
        if reply.status_code != 202:
            raise AdaptloopError(f"demo failed: feedback answered {reply.status_code}: {reply.text[:300]}")


def run_demo(settings: Settings, local_broker=None, timeout_s: float = 1500.0) -> None:
    started = time.monotonic()
    click.secho("adaptloop demo: a user's gaps become an adapter, safely", bold=True)
    stop_broker = local_broker is not None and local_broker.state() is None  # stop only what the demo started
    if local_broker is not None:
        click.echo(f"starting the local Kafka broker on port {local_broker.port}")
        bootstrap = local_broker.up()
    else:
        bootstrap = settings.kafka.bootstrap_servers
    workdir = Path(tempfile.mkdtemp(prefix="adaptloop-demo-"))
    s = demo_settings(settings, workdir, bootstrap)
    client = ClientConfig.from_settings(s)
    ensure_topics(client, plans_from_specs(s.topics.all()))
    config = write_settings(s, workdir / "settings.yaml")
    stack = Stack(workdir)
    click.echo(f"Kafka at {bootstrap}; demo files and logs in {workdir}")
    try:
        stack.up(config, bootstrap, services(s), None, say=lambda text: click.echo(f"    {text}"), timeout_s=timeout_s)
        user = f"demo-uma-{uuid.uuid4().hex[:6]}"
        topics = {
            "dlq": s.topics.dlq.name,
            "training_requests": s.topics.training_requests.name,
            "lifecycle": s.topics.lifecycle.name,
        }
        watcher = Watcher(client, topics, workdir / "logs" / "trainer.log", user, started)
        try:
            _story(s, client, watcher, workdir, timeout_s)
        finally:
            watcher.close()
    finally:
        click.echo("stopping the demo's stack")
        stack.down(say=lambda text: click.echo(f"    {text}"))
        if stop_broker:
            local_broker.down()
    click.secho(f"demo done in {time.monotonic() - started:.0f}s; files in {workdir}", bold=True)


@dataclass
class Scene:
    """What every step of the story uses: the settings, the watcher, the user's chat app, the registry, the API."""

    s: Settings
    client: ClientConfig
    w: Watcher
    workdir: Path
    timeout_s: float
    chat: Chat
    api: str
    headers: dict[str, str]

    @property
    def user(self) -> str:
        return self.w.user

    @property
    def registry(self):
        from trainer.registry import AdapterRegistry

        return AdapterRegistry.from_settings(self.s)


def _story(s: Settings, client: ClientConfig, w: Watcher, workdir: Path, timeout_s: float) -> None:
    from api.auth import TokenStore

    token = TokenStore(tokens_file(s)).create(["admin"], note="demo")[1]
    chat = Chat(f"http://{s.serving.host}:{s.serving.port}", token, w.user)
    scene = Scene(
        s, client, w, workdir, timeout_s, chat, f"http://{s.api.host}:{s.api.port}", {"Authorization": f"Bearer {token}"}
    )
    w.say(f"asking {w.user}'s questions through adaptloop serve (OpenAI's chat completions, user={w.user})", bold=True)
    before = _ask_the_base_model(scene)
    _publish_the_stream(scene, before)
    v1 = _train_and_promote_v1(scene, before)
    _reject_the_poison(scene, v1)
    _roll_back_through_the_api(scene, v1)
    _write_the_report(scene)


def _ask_the_base_model(scene: Scene) -> list[Answer]:
    questions = [q for q, *_ in FACTS] + [GENERAL[0]]
    before = scene.chat.answers(questions)
    for q, a in zip(questions, before):
        scene.w.say(f"    base model | {q} -> {_short(a.text)}")
    scene.w.say(f"    served by {before[0].fingerprint}")
    return before


def _publish_the_stream(scene: Scene, before: list[Answer]) -> None:
    """The user's corrections (through serve's feedback), satisfied turns and malformed messages; wait for the request."""
    s, w, client, user = scene.s, scene.w, scene.client, scene.user
    bad = malformed_messages()
    w.say(
        f"{user} corrects {len(FACTS)} answers (POST /v1/feedback); 2 satisfied turns and {len(bad)} malformed messages "
        "go to the input topics",
        bold=True,
    )
    for answer, (_q, correction, *_) in zip(before, FACTS):
        scene.chat.correct(answer, correction)
    ok = [
        {
            "event_id": f"{user}-ok-{n}",
            "user_id": user,
            "timestamp": _now(),
            "intent": "small_talk",
            "status": "satisfied",
            "query": "Hello!",
            "response": "Hi there.",
        }
        for n in range(2)
    ]
    produce(client, s.topics.intent_traces.name, [(user, json.dumps(e).encode()) for e in ok])
    produce(client, s.topics.intent_traces.name, [(f"{user}-mallory", raw) for raw, _ in bad])
    mallory = f"{user}-mallory".encode()
    w.wait("dead letters", lambda r: len([1 for t, k, _ in r if t == s.topics.dlq.name and k == mallory]) >= len(bad), 120)
    request = w.wait("training request", lambda _r: w.of("training_requests"), 120)[0]
    ds = request["dataset"]
    w.say(
        f"gap threshold ({s.min_gap_events}) crossed: training request {request['request_id'][:12]}… "
        f"({ds['example_counts']}, {ds['test_count']} held-out paraphrases)",
        bold=True,
    )


def _train_and_promote_v1(scene: Scene, before: list[Answer]) -> dict:
    """Training, the gate's verdict, and the user's questions again from the same server: before and after, and a
    general one that must not change."""
    w = scene.w
    v1 = _decision(w, scene.timeout_s)
    if v1["type"] != "promoted":
        raise AdaptloopError(
            f"demo failed: v{v1.get('version')} was {v1['type']}: {v1.get('reason')}; logs in {scene.workdir / 'logs'}"
        )
    m = v1.get("metrics", {})
    w.say(
        f"v{v1['version']} PROMOTED: user suite {m.get('user_score', 0):.2f}, core suite {m.get('core_score', 0):.2f} "
        f"(trained {m.get('train_seconds', 0):.0f}s, gate {m.get('gate_seconds', 0):.0f}s)",
        bold=True,
    )
    after = scene.chat.answers([p for *_, p in FACTS] + [GENERAL[0]])
    learned = 0
    for (_q, _a, key, p), old, new in zip(FACTS, before, after):
        hit = key.lower() in new.text.lower()
        learned += hit
        w.say(
            f"    {'LEARNED' if hit else 'missed '} | {p}\n               before: {_short(old.text)}\n               after:  {_short(new.text)}"
        )
    kept = GENERAL[1] in after[-1].text
    w.say(f"    {'kept   ' if kept else 'CHANGED'} | {GENERAL[0]} -> {after[-1].text}")
    w.say(f"    served by {after[0].fingerprint} (the same server, not restarted)")
    if not after[0].fingerprint.startswith(f"adaptloop:{scene.user}@v{v1['version']}:"):
        raise AdaptloopError(f"demo failed: after the promotion the server answered with {after[0].fingerprint}")
    if learned < len(FACTS) - 1 or not kept:
        raise AdaptloopError(f"demo failed: v1 answers {learned}/{len(FACTS)} facts, general answer kept: {kept}")
    return v1


def _reject_the_poison(scene: Scene, v1: dict) -> None:
    """Wrong answers to general questions cross the threshold again: the gate rejects that version, v1 stays."""
    w, user, registry = scene.w, scene.user, scene.registry
    w.say(f"{user} 'corrects' {len(POISON)} answers to general questions with wrong ones (POST /v1/feedback)", bold=True)
    for question, poison in POISON:
        scene.chat.correct(scene.chat.ask(question), poison)
    v2 = _decision(w, scene.timeout_s, after_version=v1["version"])
    if v2["type"] != "rejected" or registry.active(user) != v1["version"]:
        raise AdaptloopError(f"demo failed: the poisoned v{v2.get('version')} was {v2['type']}; active: {registry.active(user)}")
    w.say(f"v{v2['version']} REJECTED by the gate: {v2.get('reason', '')[:160]}", bold=True)
    still = scene.chat.ask(GENERAL[0])
    w.say(f"    v{v1['version']} still served | {GENERAL[0]} -> {still.text} ({still.fingerprint})")


def _roll_back_through_the_api(scene: Scene, v1: dict) -> None:
    w, user, api, headers = scene.w, scene.user, scene.api, scene.headers
    w.say(f"rolling {user} back through the API (POST /api/adapter/rollback)", bold=True)
    job = httpx.post(f"{api}/api/adapter/rollback", headers=headers, json={"user_id": user, "reason": "demo: take v1 out"}).json()
    deadline, state = time.monotonic() + 120, {}
    while time.monotonic() < deadline and state.get("status") not in ("rolled_back", "failed"):
        time.sleep(1)  # polling the job, as an API client would
        state = httpx.get(f"{api}/api/adapter/job/{job['job_id']}", headers=headers).json()
    status = httpx.get(f"{api}/api/adapter/status/{user}", headers=headers).json()
    if state.get("status") != "rolled_back" or status.get("active_version") is not None:
        raise AdaptloopError(f"demo failed: rollback job {state}; status {status}")
    w.say(f"ROLLED BACK: v{v1['version']} -> base model, the state before v{v1['version']}", bold=True)
    again = scene.chat.ask(FACTS[0][3])
    w.say(f"    base model again | {FACTS[0][3]} -> {again.text}")
    w.say(f"    served by {again.fingerprint} (the same server, not restarted)")
    if not again.fingerprint.startswith("adaptloop:base:"):
        raise AdaptloopError(f"demo failed: after the rollback the server answered with {again.fingerprint}")


def _write_the_report(scene: Scene) -> None:
    from trainer.report import build_report

    out = scene.workdir / "report"
    build_report(scene.registry, scene.user, threshold=scene.s.promote_if_score).write(out)
    scene.w.say(f"report: {out / 'index.html'} (a running API serves the same page at /dashboard/{scene.user})", bold=True)


def _decision(w: Watcher, timeout_s: float, after_version: int = 0) -> dict:
    """Wait for the trainer's verdict on the user's next version (the watcher narrates the way there)."""

    def verdict(_records):
        found = [
            v
            for v in w.of("lifecycle")
            if v.get("type") == "training_failed"
            or v.get("type") in ("promoted", "rejected")
            and (v.get("version") or 0) > after_version
        ]
        return found[0] if found else None

    return w.wait("training outcome", verdict, timeout_s)


def _short(answer: str, limit: int = 100) -> str:
    answer = " ".join(answer.split())
    return answer if len(answer) <= limit else answer[: limit - 1] + "…"


def _now() -> str:
    from datetime import datetime

    return datetime.now(UTC).isoformat()
