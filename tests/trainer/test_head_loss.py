"""The output projection's losses fused: the plain operations' losses and gradients, in any precision and chunking."""

from __future__ import annotations

import pytest
import torch

import trainer.head_loss as head_loss
from trainer.head_loss import anchor_divergence, base_log_probs, head_losses, plain_head_losses
from trainer.precision import FrozenMatmuls, multiplying_weight

pytestmark = pytest.mark.unit

HIDDEN, VOCAB, POSITIONS = 16, 300, 13


@pytest.fixture
def head():
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    lm_head.weight.requires_grad_(False)  # frozen, as the base model's
    return lm_head


@pytest.fixture
def small_chunks(monkeypatch):
    """Two positions per chunk: the chunks' seams are crossed many times."""
    monkeypatch.setattr(head_loss, "_CHUNK_VALUES", 2 * VOCAB)


def _inputs(anchors: bool = True):
    hidden = torch.randn(POSITIONS, HIDDEN)
    targets = torch.randint(0, VOCAB, (POSITIONS,))
    kl_positions = torch.tensor([n % 3 == 1 for n in range(POSITIONS)]) if anchors else None
    base_hidden = hidden[kl_positions] + 0.3 * torch.randn(int(kl_positions.sum()), HIDDEN) if anchors else None
    return hidden, targets, kl_positions, base_hidden


def _losses_and_grad(losses_of, lm_head, hidden, *rest):
    hidden = hidden.clone().requires_grad_()
    losses = losses_of(lm_head, hidden, *rest)
    upstream = torch.linspace(0.5, 2.0, POSITIONS)  # each position's own weight in the step's loss
    (losses * upstream).sum().backward()
    return losses.detach(), hidden.grad


@pytest.mark.parametrize("divergence", ["forward", "reverse", "symmetric"])
def test_fused_losses_and_gradients_equal_the_plain_operations(head, small_chunks, divergence):
    hidden, targets, kl_positions, base_hidden = _inputs()
    rest = (targets, kl_positions, base_hidden, 4.0, divergence)
    fused, fused_grad = _losses_and_grad(head_losses, head, hidden, *rest)
    plain, plain_grad = _losses_and_grad(plain_head_losses, head, hidden, *rest)
    assert torch.allclose(fused, plain, atol=1e-5)
    assert torch.allclose(fused_grad, plain_grad, atol=1e-6, rtol=1e-4)
    assert (fused[kl_positions] > 0).all() and fused_grad[kl_positions].abs().sum() > 0


@pytest.mark.parametrize("divergence", ["forward", "symmetric"])
def test_the_base_log_probabilities_kept_for_a_run_give_the_same_losses_and_gradients(head, small_chunks, divergence):
    hidden, targets, kl_positions, base_hidden = _inputs()
    base_logp = base_log_probs(head, base_hidden)
    assert base_logp.shape == (len(base_hidden), VOCAB) and base_logp.dtype == torch.float32
    projected, projected_grad = _losses_and_grad(head_losses, head, hidden, targets, kl_positions, base_hidden, 4.0, divergence)
    kept, kept_grad = _losses_and_grad(head_losses, head, hidden, targets, kl_positions, None, 4.0, divergence, base_logp)
    plain, plain_grad = _losses_and_grad(plain_head_losses, head, hidden, targets, kl_positions, None, 4.0, divergence, base_logp)
    assert torch.allclose(kept, projected, atol=1e-6) and torch.allclose(kept_grad, projected_grad, atol=1e-7, rtol=1e-5)
    assert torch.allclose(plain, projected, atol=1e-5) and torch.allclose(plain_grad, projected_grad, atol=1e-6, rtol=1e-4)
    assert torch.equal(base_logp, base_log_probs(head, base_hidden))  # the kept tensor is read, never written


def test_a_projection_that_trains_keeps_no_base_log_probabilities(head):
    head.weight.requires_grad_(True)
    assert base_log_probs(head, torch.randn(3, HIDDEN)) is None


def test_without_anchors_every_position_is_cross_entropy(head, small_chunks):
    head.bias = torch.nn.Parameter(torch.randn(VOCAB), requires_grad=False)
    hidden, targets, _, _ = _inputs(anchors=False)
    fused, fused_grad = _losses_and_grad(head_losses, head, hidden, targets)
    plain, plain_grad = _losses_and_grad(plain_head_losses, head, hidden, targets)
    assert torch.allclose(fused, torch.nn.functional.cross_entropy(head(hidden), targets, reduction="none"), atol=1e-5)
    assert torch.allclose(fused, plain, atol=1e-5) and torch.allclose(fused_grad, plain_grad, atol=1e-6, rtol=1e-4)


def test_the_fused_path_multiplies_in_the_frozen_products_precision(head, small_chunks):
    hidden, targets, kl_positions, base_hidden = _inputs()
    rest = (targets, kl_positions, base_hidden, 4.0, "symmetric")
    matmuls = FrozenMatmuls(torch.nn.Sequential(head), torch.bfloat16)
    with matmuls.active():
        assert multiplying_weight(head) is matmuls.copies[head]
        fused, fused_grad = _losses_and_grad(head_losses, head, hidden, *rest)
        plain, plain_grad = _losses_and_grad(plain_head_losses, head, hidden, *rest)
    assert multiplying_weight(head) is head.weight
    full_precision, _ = _losses_and_grad(head_losses, head, hidden, *rest)
    assert torch.allclose(fused, plain, atol=1e-5)  # the same bfloat16 logits, the same float32 work on them
    assert torch.allclose(fused_grad, plain_grad, atol=1e-6, rtol=1e-4)  # scaled in float32, then rounded: as autograd
    assert not torch.allclose(fused, full_precision, atol=1e-6)  # it did multiply in bfloat16


def test_without_gradients_the_losses_are_the_same(head, small_chunks):
    hidden, targets, kl_positions, base_hidden = _inputs()
    with torch.no_grad():
        quiet = head_losses(head, hidden, targets, kl_positions, base_hidden, 4.0)
    assert torch.allclose(quiet, plain_head_losses(head, hidden, targets, kl_positions, base_hidden, 4.0), atol=1e-5)


def test_a_projection_that_trains_gets_its_gradient_from_the_plain_operations(head):
    head.weight.requires_grad_(True)
    hidden, targets, kl_positions, base_hidden = _inputs()
    head_losses(head, hidden, targets, kl_positions, base_hidden, 4.0).sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_reverse_kl_sees_mass_moved_onto_a_token_the_base_model_finds_unlikely():
    # Base: "Dublin" 0.6, "Moscow" 0.4, "Lviv" almost never. The adapter moves a fifth of the mass onto "Lviv".
    base = torch.tensor([[0.6, 0.4, 1e-6]]).log()
    leaked = torch.tensor([[0.48, 0.32, 0.2]]).log()
    forward, reverse = anchor_divergence(leaked, base, "forward"), anchor_divergence(leaked, base, "reverse")
    assert reverse.item() > 5 * forward.item(), "forward KL barely notices the leak; reverse KL does"
    assert torch.allclose(anchor_divergence(leaked, base, "symmetric"), forward + reverse)
    assert anchor_divergence(base, base).abs().item() < 1e-6
