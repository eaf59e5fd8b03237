"""Consumer lag of adaptloop's groups, as a Prometheus collector.

    adaptloop_consumer_lag_messages{group="adaptloop-trainer", topic="adapter.training-requests"} 3

Lag of a partition = its end offset - the group's committed offset (the whole
partition when nothing is committed yet), summed per topic: a label per
partition or per user would explode the series count. Each scrape asks the
broker at most once per `ttl_s`; when it cannot answer, the lag is left out
and `adaptloop_consumer_lag_errors_total` counts the failure, so a scrape
never hangs on a broker outage for more than `timeout_s`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from core.errors import KafkaOperationError
from core.kafka.client import ClientConfig

log = logging.getLogger(__name__)


def group_lag(admin: AdminClient, group: str, topics: list[str], timeout_s: float = 5.0) -> dict[str, int]:
    """Messages not yet consumed by `group`, per topic (only topics that exist)."""
    try:
        metadata = admin.list_topics(timeout=timeout_s)
        partitions = [TopicPartition(t, p) for t in topics if t in metadata.topics for p in metadata.topics[t].partitions]
        if not partitions:
            return {}
        ends = admin.list_offsets({tp: OffsetSpec.latest() for tp in partitions}, request_timeout=timeout_s)
        request = [ConsumerGroupTopicPartitions(group, partitions)]
        committed = admin.list_consumer_group_offsets(request, request_timeout=timeout_s)[group].result(timeout_s)
        done = {(tp.topic, tp.partition): tp.offset for tp in committed.topic_partitions if tp.offset >= 0}
        # Nothing committed yet: everything still in the partition is lag.
        fresh = [tp for tp in partitions if (tp.topic, tp.partition) not in done]
        starts = admin.list_offsets({tp: OffsetSpec.earliest() for tp in fresh}, request_timeout=timeout_s) if fresh else {}
        lag: dict[str, int] = {}
        for tp in partitions:
            end = ends[tp].result(timeout_s).offset
            key = (tp.topic, tp.partition)
            start = done[key] if key in done else starts[tp].result(timeout_s).offset
            lag[tp.topic] = lag.get(tp.topic, 0) + max(0, end - start)
        return lag
    except Exception as exc:  # KafkaException, timeouts: the caller reports the failure
        raise KafkaOperationError(f"consumer lag of {group}: {exc}") from None


class ConsumerLagCollector:
    """Registered on a CollectorRegistry; `groups` maps a consumer group to the topics it reads."""

    def __init__(self, client: ClientConfig, groups: dict[str, list[str]], ttl_s: float = 5.0, timeout_s: float = 5.0) -> None:
        self.client = client
        self.groups = groups
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._admin: AdminClient | None = None
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[tuple[str, str], int]] = (0.0, {})
        self.errors = 0

    def _lags(self) -> dict[tuple[str, str], int]:
        with self._lock:
            at, lags = self._cached
            if time.monotonic() - at < self.ttl_s:
                return lags
            if self._admin is None:
                self._admin = AdminClient(self.client.librdkafka())
            lags = {}
            for group, topics in self.groups.items():
                try:
                    lags |= {(group, topic): n for topic, n in group_lag(self._admin, group, topics, self.timeout_s).items()}
                except KafkaOperationError as exc:
                    self.errors += 1
                    log.warning("%s", exc)
            self._cached = (time.monotonic(), lags)
            return lags

    def collect(self) -> Iterator:
        lag = GaugeMetricFamily(
            "adaptloop_consumer_lag_messages", "Messages not yet consumed, per group and topic", labels=["group", "topic"]
        )
        for (group, topic), n in sorted(self._lags().items()):
            lag.add_metric([group, topic], n)
        yield lag
        yield CounterMetricFamily("adaptloop_consumer_lag_errors", "Lag lookups the broker did not answer", value=self.errors)

    def describe(self) -> list:
        return []  # no describe-time broker call when the collector is registered
