"""Dataset shaping before a run: replayed examples thinned to a reminder per earlier fact."""

from __future__ import annotations

import pytest

from schemas.training import TrainingExample
from trainer.data import thin_replay

pytestmark = pytest.mark.unit


def _example(prompt: str, response: str, source: str = "correction", weight: float = 1.0) -> TrainingExample:
    return TrainingExample(prompt=prompt, response=response, source=source, weight=weight)


def test_replay_keeps_the_heaviest_reminders_per_earlier_fact_and_every_new_example():
    new = [
        _example("What is my cat called?", "Your cat is called Pixel."),
        _example("My cat's name?", "Your cat is called Pixel."),
    ]
    replay = [
        _example("Where was my sister born?", "Your sister was born in Ghent.", "replay", 1.0),
        _example("My sister's birthplace?", "Your sister was born in Ghent.", "replay", 2.0),
        _example("Which city is my sister from?", "Your sister was born in Ghent.", "replay", 1.5),
        _example("What is my badge number?", "Your badge number is 4411.", "replay"),
    ]
    examples = new + replay
    assert thin_replay(examples, 1) == new + [replay[1], replay[3]], "order kept; the heaviest reminder per fact"
    assert thin_replay(examples, 2) == new + [replay[1], replay[2], replay[3]]
    assert thin_replay(examples, 0) == examples, "0 keeps every replayed example"
    assert thin_replay(new, 1) == new, "new examples are never thinned, paraphrases included"


def test_loading_a_model_prints_no_tokenizer_clean_up_warning(tiny_model_dir, capfd, caplog):
    """The BPE tokenizer is told not to clean up spaces, so transformers has nothing to warn about at each load."""
    from trainer.model import BaseModelRef, load_base

    _model, tokenizer, _device = load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")
    assert tokenizer.decode(tokenizer("Hi , there !").input_ids) == "Hi , there !", "spaces before punctuation stay"
    out, err = capfd.readouterr()
    assert "clean_up_tokenization" not in out + err + caplog.text


def test_even_slices_cover_every_row_once_in_batches_of_near_equal_size():
    from trainer.data import even_slices

    assert [(s.start, s.stop) for s in even_slices(440, 128)] == [(0, 110), (110, 220), (220, 330), (330, 440)]
    assert [(s.start, s.stop) for s in even_slices(10, 4)] == [(0, 4), (4, 7), (7, 10)]
    assert even_slices(0, 8) == []
    for count in range(1, 60):
        for most in range(1, 20):
            slices = even_slices(count, most)
            sizes = [s.stop - s.start for s in slices]
            assert [i for s in slices for i in range(s.start, s.stop)] == list(range(count))
            assert len(slices) == -(-count // most) and max(sizes) <= most and max(sizes) - min(sizes) <= 1
