"""The project's metric conventions, checked on a scraped page."""

from __future__ import annotations


def check_metric_names(text: str) -> None:
    """Prometheus conventions: the adaptloop_ prefix, counters end in _total, no per-user labels."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name.startswith(("python_", "process_")):
            continue  # the client library's own
        assert family.name.startswith("adaptloop_"), family.name
        for sample in family.samples:
            assert "user_id" not in sample.labels and "user" not in sample.labels, sample
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
