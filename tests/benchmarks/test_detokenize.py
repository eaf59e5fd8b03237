"""The detokenization benchmark's two streams send the same pieces, and its baseline decodes the whole answer."""

from __future__ import annotations

import pytest

from benchmarks.detokenize import WholeDecode, measure

pytestmark = pytest.mark.unit


def test_both_streams_send_the_same_pieces_and_the_baseline_decodes_everything(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    row = measure(tokenizer, 96, rounds=1)  # exits if the pieces differ
    assert row["tokens"] == 96 and row["whole_mean_ms"] > 0 and row["incremental_mean_ms"] > 0
    calls: list[int] = []
    baseline = WholeDecode(tokenizer, ())
    baseline._decode = lambda ids: calls.append(len(ids)) or tokenizer.decode(ids, skip_special_tokens=True)
    for token in tokenizer("Hello there, friend", add_special_tokens=False)["input_ids"]:
        baseline.push(token)
    assert calls == list(range(1, len(calls) + 1)), "every token decodes the whole answer again"
