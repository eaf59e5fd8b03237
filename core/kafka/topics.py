"""Create adaptloop's topics idempotently with their partitions and configs."""

from __future__ import annotations

import time
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from core.errors import KafkaOperationError
from core.kafka.client import ClientConfig


@dataclass(frozen=True)
class TopicPlan:
    name: str
    partitions: int
    replication_factor: int = 1
    config: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TopicOutcome:
    name: str
    created: bool
    partitions: int
    note: str = ""


def ensure_topics(client: ClientConfig, plans: list[TopicPlan], timeout: float = 30.0) -> list[TopicOutcome]:
    """Create every missing topic; report existing ones (and a partition-count mismatch)."""
    refused: list[str] = []  # credentials the broker refused: no point in waiting out the timeout
    admin = AdminClient(client.librdkafka(error_cb=lambda err: _note_refusal(err, refused)))
    existing = _list_topics(admin, client, timeout, refused)
    outcomes: list[TopicOutcome] = []
    missing = [p for p in plans if p.name not in existing]
    for plan in plans:
        if plan.name in existing:
            have = len(existing[plan.name].partitions)
            note = "" if have == plan.partitions else f"has {have} partitions, config says {plan.partitions}"
            outcomes.append(TopicOutcome(plan.name, created=False, partitions=have, note=note))
    if missing:
        futures = admin.create_topics(
            [NewTopic(p.name, p.partitions, p.replication_factor, config=dict(p.config)) for p in missing],
            operation_timeout=timeout,
            request_timeout=timeout,
        )
        for plan in missing:
            try:
                futures[plan.name].result(timeout=timeout)
                outcomes.append(TopicOutcome(plan.name, created=True, partitions=plan.partitions))
            except KafkaException as exc:
                err = exc.args[0]
                if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    outcomes.append(TopicOutcome(plan.name, created=False, partitions=plan.partitions))
                else:
                    raise KafkaOperationError(f"creating topic {plan.name} failed: {exc}") from None
    order = {p.name: i for i, p in enumerate(plans)}
    return sorted(outcomes, key=lambda o: order[o.name])


_REFUSALS = {KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError._SSL}


def _note_refusal(err: KafkaError, refused: list[str]) -> None:
    if err.code() in _REFUSALS:
        refused.append(err.str())


def _list_topics(admin: AdminClient, client: ClientConfig, timeout: float, refused: list[str]) -> dict:
    """The cluster's topics; a refused login fails at once, with the broker's reason (never the secret)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            return admin.list_topics(timeout=max(0.1, min(1.0, remaining))).topics
        except KafkaException as exc:
            admin.poll(0)  # serve the error callback
            if refused:
                raise KafkaOperationError(f"Kafka at {client.bootstrap_servers} refused this client: {refused[0]}") from None
            if remaining <= 1.0:
                raise KafkaOperationError(f"cannot reach Kafka at {client.bootstrap_servers}: {exc}") from None


def plans_from_specs(specs: list) -> list[TopicPlan]:
    """TopicPlans from the settings' TopicSpec entries."""
    return [TopicPlan(s.name, s.partitions, s.replication_factor, tuple(sorted(s.config.items()))) for s in specs]
