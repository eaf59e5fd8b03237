"""Create adaptloop's topics idempotently with their partitions and configs."""

from __future__ import annotations

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
    admin = AdminClient(client.librdkafka())
    try:
        existing = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        raise KafkaOperationError(f"cannot reach Kafka at {client.bootstrap_servers}: {exc}") from None
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


def plans_from_specs(specs: list) -> list[TopicPlan]:
    """TopicPlans from the settings' TopicSpec entries."""
    return [TopicPlan(s.name, s.partitions, s.replication_factor, tuple(sorted(s.config.items()))) for s in specs]
