"""The demo, as `make demo` runs it, against the test broker: a real worker, real requests."""

from __future__ import annotations

import pytest

from adaptloop.demo import run_demo

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_demo_dead_letters_and_emits_training_requests(isolated_settings, capsys):
    run_demo(isolated_settings(), local_broker=None)
    out = capsys.readouterr().out
    assert "24 events curated, 7 malformed messages dead-lettered, 2 training requests emitted" in out
    assert out.count("training request for demo-") == 2
