"""The demo, as `make demo` runs it, against the test broker."""

from __future__ import annotations

import pytest

from adaptloop.demo import run_demo

pytestmark = pytest.mark.kafka


def test_demo_publishes_consumes_and_dead_letters(isolated_settings, capsys):
    run_demo(isolated_settings(), local_broker=None)
    out = capsys.readouterr().out
    assert "24 events consumed, 7 malformed messages dead-lettered" in out
