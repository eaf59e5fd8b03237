"""Feedback on served answers, as the loop's own input events.

`adaptloop serve` keeps its last `serving.feedback_window` completions
(question and answer, by completion id). `POST /v1/feedback` turns a rating or
a correction of one of them into a `Feedback` event on the feedback topic,
with the original question and answer, which the worker curates like any
producer's; with `serving.publish_conversations` every completion is also
published as a `ConversationTurn`. A chat app plugged into the server feeds
the loop with nothing else to write.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

from confluent_kafka import Producer

from core.errors import AdaptloopError, KafkaOperationError
from core.kafka.client import ClientConfig
from schemas.common import MAX_TEXT_CHARS
from schemas.events import ConversationTurn, Feedback
from serving.protocol import FeedbackRequest

_NOTHING_SAID = "(no answer)"  # an event's texts may not be empty
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _text(value: str) -> str:
    """Fit a question or an answer to an event's text field: no control characters, at most MAX_TEXT_CHARS, not empty."""
    return _CONTROL.sub("", value)[:MAX_TEXT_CHARS].strip() or _NOTHING_SAID


class UnknownCompletion(AdaptloopError):
    """No completion with that id was ever served here (`expired`: it was, and has left the window)."""

    def __init__(self, completion_id: str, expired: bool) -> None:
        super().__init__(
            f"completion {completion_id} is no longer kept (serving.feedback_window)"
            if expired
            else f"no completion {completion_id}"
        )
        self.expired = expired


@dataclass(frozen=True)
class Completion:
    id: str
    user_id: str | None
    question: str
    answer: str
    model: str
    created: float


class RecentCompletions:
    """The last `window` completions by id; ids that left the window are remembered (ten times as many) as expired."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._kept: OrderedDict[str, Completion] = OrderedDict()
        self._gone: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, completion: Completion) -> None:
        with self._lock:
            self._kept[completion.id] = completion
            while len(self._kept) > self.window:
                gone, _ = self._kept.popitem(last=False)
                self._gone[gone] = None
                while len(self._gone) > 10 * self.window:
                    self._gone.popitem(last=False)

    def get(self, completion_id: str) -> Completion:
        with self._lock:
            found = self._kept.get(completion_id)
            if found is None:
                raise UnknownCompletion(completion_id, expired=completion_id in self._gone)
            return found


def feedback_event(completion: Completion, request: FeedbackRequest) -> Feedback:
    """The input event a rating or correction of `completion` is (its user must be known)."""
    assert completion.user_id is not None
    common = {
        "event_id": f"serve-fb-{uuid.uuid4().hex}",
        "user_id": completion.user_id,
        "timestamp": datetime.now(UTC),
        "query": _text(completion.question),
        "response": _text(completion.answer),
        "comment": request.comment,
    }
    if request.correction is not None:
        return Feedback(kind="correction", correction=request.correction, **common)
    return Feedback(kind="rating", rating=request.rating, rating_scale="unit", **common)


def conversation_event(completion: Completion) -> ConversationTurn:
    assert completion.user_id is not None
    return ConversationTurn(
        event_id=f"serve-turn-{completion.id}",  # one per completion, however often it is sent
        user_id=completion.user_id,
        timestamp=datetime.fromtimestamp(completion.created, UTC),
        session_id=completion.id[:200],
        question=_text(completion.question),
        answer=_text(completion.answer),
    )


class EventPublisher:
    """One producer for the server's whole life; `send` waits for Kafka's acknowledgement (call it off the event loop)."""

    def __init__(self, client: ClientConfig) -> None:
        self.producer = Producer(client.librdkafka_producer(**{"enable.idempotence": True, "partitioner": "murmur2_random"}))

    def send(self, topic: str, key: str, value: bytes, timeout: float = 15.0) -> None:
        errors: list[str] = []
        self.producer.produce(topic, key=key, value=value, on_delivery=lambda err, _msg: err and errors.append(str(err)))
        deadline = time.monotonic() + timeout
        while self.producer.flush(0.1) and time.monotonic() < deadline:
            pass
        if len(self.producer):
            self.producer.purge(in_queue=True)  # what never left is not sent later, behind the back of a caller told it failed
            self.producer.flush(0)
            raise KafkaOperationError(f"event to {topic} not acknowledged within {timeout:.0f}s")
        if errors:
            raise KafkaOperationError(f"event to {topic} not acknowledged: {errors[0]}")

    def close(self) -> None:
        self.producer.flush(10)
