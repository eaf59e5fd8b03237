"""LoRA dropout drawn from its dropped positions (trainer/dropout.py): torch's distribution, its gradient, PEFT's modules."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.dropout import SparseDropout, dropped_positions, sparse_dropout
from trainer.lora import add_lora
from trainer.model import BaseModelRef, load_base

pytestmark = pytest.mark.unit

P = 0.05


def within_sigmas(count: int, n: int, p: float, sigmas: float = 6.0) -> bool:
    """`count` successes of `n` Bernoulli(p) trials is within `sigmas` standard deviations of the mean."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_each_element_is_dropped_with_probability_p_independently_of_its_neighbours():
    torch.manual_seed(0)
    n = 2_000_000
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[dropped_positions(n, P)] = True
    assert within_sigmas(int(dropped.sum()), n, P)
    half = n // 2
    assert within_sigmas(int(dropped[:half].sum()), half, P) and within_sigmas(int(dropped[half:].sum()), half, P)
    # After a dropped element the next is dropped with probability p, as after a kept one: no runs, no gaps.
    after_dropped = dropped[1:][dropped[:-1]]
    after_kept = dropped[1:][~dropped[:-1]]
    assert within_sigmas(int(after_dropped.sum()), after_dropped.numel(), P)
    assert within_sigmas(int(after_kept.sum()), after_kept.numel(), P)


@pytest.mark.parametrize("n,p", [(1, 0.5), (7, 0.05), (100, 0.001), (1000, 0.9), (50_000, 0.05)])
def test_positions_are_in_range_ascending_and_distinct(n, p):
    torch.manual_seed(1)
    for _ in range(50):
        positions = dropped_positions(n, p)
        assert positions.dtype == torch.int64
        assert bool((positions >= 0).all() and (positions < n).all())
        assert bool((positions[1:] > positions[:-1]).all()), "each position once, in order"


def test_a_high_p_needs_more_gaps_than_first_drawn_and_still_covers_the_whole_range():
    torch.manual_seed(2)
    n = 10_000
    counts = [dropped_positions(n, 0.9).numel() for _ in range(20)]
    assert all(within_sigmas(c, n, 0.9) for c in counts)


def test_the_same_seed_drops_the_same_elements():
    x = torch.randn(64, 96)
    torch.manual_seed(3)
    first = sparse_dropout(x, P)
    torch.manual_seed(3)
    assert torch.equal(first, sparse_dropout(x, P))
    assert not torch.equal(first, sparse_dropout(x, P)), "a new draw the next time"


def test_kept_elements_are_scaled_and_the_gradient_is_the_same_mask():
    torch.manual_seed(4)
    x = (torch.rand(32, 40, 24) + 0.5).requires_grad_()  # no zeros: a zero in `y` is a dropped element
    y = sparse_dropout(x, P)
    kept = y != 0
    assert torch.allclose(y[kept], x.detach()[kept] / (1 - P))
    assert within_sigmas(int((~kept).sum()), x.numel(), P)
    weights = torch.randn_like(x)
    (y * weights).sum().backward()
    assert torch.allclose(x.grad, weights * kept / (1 - P)), "the backward pass drops what the forward dropped"


def test_p_zero_and_one_and_eval_mode():
    x = torch.randn(8, 8)
    assert sparse_dropout(x, 0.0) is x
    assert torch.equal(sparse_dropout(x, 1.0), torch.zeros_like(x))
    module = SparseDropout(P).eval()
    assert module(x) is x


def test_peft_loras_draw_their_dropout_this_way(tiny_model_dir):
    model, _tokenizer, _device = load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")
    peft_model = add_lora(model, r=4, alpha=8, dropout=P, target_modules=("q_proj", "v_proj"), top_layer_share=1.0)
    try:
        dropouts = [d for m in peft_model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
        assert dropouts and all(isinstance(d, SparseDropout) and d.p == P for d in dropouts)
        assert not any(isinstance(m, torch.nn.Dropout) for m in peft_model.modules() if m not in dropouts)
    finally:
        peft_model.unload()
