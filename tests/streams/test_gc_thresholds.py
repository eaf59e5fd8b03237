"""The worker's garbage-collector thresholds (streams/worker.py): above a batch's young garbage, and bounded."""

from __future__ import annotations

import pytest

from core.settings import defaults
from streams.worker import gc_thresholds

# Short-lived containers one message leaves for the collector (records, envelopes, examples, their dicts): the
# upper end of what gc_thresholds' docstring measured.
GARBAGE_PER_MESSAGE = 40
CAP = 2_000_000  # cyclic garbage never waits for more allocations than this
PYTHON_DEFAULTS = (700, 10, 10)  # CPython's gc.get_threshold() at start-up


@pytest.mark.parametrize("batch_size", [1, 100, 1_000, 8_000, 50_000, 10**6])
def test_the_youngest_generation_holds_a_whole_batch_of_garbage_up_to_the_cap(batch_size):
    young, middle, old = gc_thresholds(batch_size)
    assert young >= min(GARBAGE_PER_MESSAGE * batch_size, CAP)  # no collection midway through a batch
    assert 50_000 <= young <= CAP
    assert middle > PYTHON_DEFAULTS[1] and old > PYTHON_DEFAULTS[2]  # the long-lived tables are walked less often


def test_larger_batches_never_lower_the_threshold():
    youngest = [gc_thresholds(n)[0] for n in (1, 10, 1_000, 8_000, 40_000, 10**6)]
    assert youngest == sorted(youngest)


def test_the_shipped_batch_size_is_above_pythons_defaults():
    young, middle, old = gc_thresholds(defaults().streams.batch_size)
    assert all(ours > python for ours, python in zip((young, middle, old), PYTHON_DEFAULTS, strict=True))
    assert young >= GARBAGE_PER_MESSAGE * defaults().streams.batch_size
