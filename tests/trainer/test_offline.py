from __future__ import annotations

import pytest

from trainer.offline import no_fact_lost

pytestmark = pytest.mark.unit


def test_a_shrunk_update_may_not_lose_a_fact_the_trained_one_answers():
    trained = [True, False, True]  # one held-out paraphrase never learned
    assert no_fact_lost([True, False, True], trained)
    assert no_fact_lost([True, True, True], trained)
    assert not no_fact_lost([True, False, False], trained)
    # Without an epoch check to compare with (early stopping off), every case must be answered.
    assert no_fact_lost([True, True], []) and not no_fact_lost([True, False], [])
