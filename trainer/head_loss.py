"""Each answer position's loss through the output projection, in one pass over the vocabulary.

    per_token = head_losses(lm_head, hidden, targets, kl_positions, base_hidden, kl_weight, "symmetric")
    base_logp = base_log_probs(lm_head, base_hidden)   # once per run: the same losses, the base's product saved
    per_token = head_losses(lm_head, hidden, targets, kl_positions, kl_weight=4.0, base_logp=base_logp)

A position predicting a user's answer token is scored by cross-entropy; an
anchor's position (`kl_positions`) by its divergence from the base model's
distribution there (`base_hidden`: the base model's states at those
positions, in order; or `base_logp`: its log-probabilities there, computed
once per run by `base_log_probs` instead of at every step), times
`kl_weight`.

Why fused: the work over the vocabulary (49,152 wide for the default model)
at every answer position, written as plain tensor operations, made more
than twenty passes over [positions x vocabulary] tensors, each too large
for the CPU's caches (log-softmax twice, the divergence's terms, their
backward, an index's scatter): about 1.4 s of a 5 s training step of eight
users' rows. Here the logits come from one product, each chunk of rows is
then worked while it sits in cache, and each position's loss and its
gradient with respect to its logits are computed in the same pass from
closed forms (la, lb: the adapted and the base log-probabilities, pa, pb
their probabilities, z the logits):

    cross-entropy on target t     lse(z) - z_t                d/dz = pa - onehot(t)
    forward  KL(base || adapted)  sum pb (lb - la)            d/dz = pa - pb
    reverse  KL(adapted || base)  sum pa (la - lb) =: R       d/dz = pa (la - lb - R)
    symmetric                     forward + reverse           d/dz = the sum of both

The backward pass scales those gradients by each position's share of the
step's loss, rounds them to the precision the weight multiplies in, and
makes one product with the weight: what autograd's own backward does, so
the gradients match the plain operations' to float rounding (a batch of
users trains as each alone: tests/trainer/test_multi.py). A projection
that trains, or is not a plain linear layer, takes the plain operations (`plain_head_losses`, also
the reference the fused path is tested against).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.precision import multiplying_weight

# Logits per chunk: 2**18 float32 values (1 MB) stay in a core's cache while a chunk is worked on.
_CHUNK_VALUES = 1 << 18


def anchor_divergence(adapted_logp, base_logp, divergence: str = "symmetric"):
    """Per-position divergence of the adapted from the base next-token distribution (log-probabilities in).

    forward KL(base || adapted) keeps the base model's likely tokens likely,
    but barely notices the adapter moving mass onto tokens the base model
    finds unlikely, which is how a user's facts leak into general answers
    ("The capital of Ireland is Lviv."); reverse KL(adapted || base) is large
    exactly there. "symmetric" is their sum.
    """
    if divergence == "forward":
        return (base_logp.exp() * (base_logp - adapted_logp)).sum(dim=-1)
    if divergence == "reverse":
        return (adapted_logp.exp() * (adapted_logp - base_logp)).sum(dim=-1)
    # forward + reverse in one pass over the vocabulary: sum (p_base - p_adapted)(log p_base - log p_adapted)
    return ((base_logp.exp() - adapted_logp.exp()) * (base_logp - adapted_logp)).sum(dim=-1)


def head_losses(
    lm_head, hidden, targets, kl_positions=None, base_hidden=None, kl_weight: float = 0.0, divergence="symmetric", base_logp=None
):
    """Each position's loss (float32, one per row of `hidden`): see the module's docstring."""
    if kl_positions is not None and not bool(kl_positions.any()):
        kl_positions = None
    if not _fused(lm_head):
        return plain_head_losses(lm_head, hidden, targets, kl_positions, base_hidden, kl_weight, divergence, base_logp)
    weight, bias = _projection(lm_head)
    base = base_logp if base_logp is not None else base_hidden
    return _FusedHeadLosses.apply(hidden, weight, bias, targets, kl_positions, base, base_logp is not None, kl_weight, divergence)


def base_log_probs(lm_head, base_hidden):
    """The base model's log-probabilities (float32, positions x vocabulary) at its states `base_hidden`, as
    `head_losses` computes them from those states at every step; None where the projection is not the fused
    path's (a projection that trains: its base side changes as it does)."""
    if not _fused(lm_head):
        return None
    weight, bias = _projection(lm_head)
    with torch.no_grad():
        return F.log_softmax(F.linear(base_hidden.to(weight.dtype), weight, bias).float(), dim=-1)


def _projection(lm_head):
    """(weight, bias) the frozen projection multiplies by now (`multiplying_weight`), the bias in its precision."""
    weight = multiplying_weight(lm_head)
    return weight, None if lm_head.bias is None else lm_head.bias.to(weight.dtype)


def _fused(lm_head) -> bool:
    return type(lm_head) is torch.nn.Linear and not lm_head.weight.requires_grad


def plain_head_losses(
    lm_head, hidden, targets, kl_positions=None, base_hidden=None, kl_weight=0.0, divergence="symmetric", base_logp=None
):
    """The same losses as plain tensor operations, through `lm_head` as it is."""
    logits = lm_head(hidden).float()
    per_token = F.cross_entropy(logits, targets, reduction="none")
    if kl_positions is None:
        return per_token
    if base_logp is None:
        with torch.no_grad():
            base_logp = F.log_softmax(lm_head(base_hidden).float(), dim=-1)
    kl = anchor_divergence(F.log_softmax(logits[kl_positions], dim=-1), base_logp, divergence)
    return per_token.masked_scatter(kl_positions, kl * kl_weight)


class _FusedHeadLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, kl_positions, base, base_is_logp, kl_weight, divergence):
        logits = F.linear(hidden.to(weight.dtype), weight, bias)
        wants_grad = ctx.needs_input_grad[0]
        grads = torch.empty_like(logits, dtype=torch.float32) if wants_grad else None
        losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        chunk = max(1, _CHUNK_VALUES // logits.shape[1])
        answered = torch.arange(len(targets), device=logits.device) if kl_positions is None else (~kl_positions).nonzero()[:, 0]
        for rows in answered.split(chunk):
            _cross_entropy(logits, rows, targets[rows], losses, grads)
        if kl_positions is not None:  # the n-th anchored position's base side is row n of `base`
            base_logits = base if base_is_logp else F.linear(base.to(weight.dtype), weight, bias)
            for rows, base_rows in zip(kl_positions.nonzero()[:, 0].split(chunk), base_logits.split(chunk)):
                _divergence(logits, rows, base_rows, base_is_logp, divergence, kl_weight, losses, grads)
        ctx.save_for_backward(grads, weight)
        ctx.hidden_dtype = hidden.dtype
        return losses

    @staticmethod
    def backward(ctx, upstream):
        grads, weight = ctx.saved_tensors
        # Scaled before the product, in float32, then rounded to the weight's precision: as autograd does.
        scaled = grads.mul_(upstream[:, None].to(grads.dtype)).to(weight.dtype)
        return (scaled @ weight).to(ctx.hidden_dtype), None, None, None, None, None, None, None, None


def _cross_entropy(logits, rows, targets, losses, grads) -> None:
    """Cross-entropy at `rows` into `losses`, and its gradient with respect to their logits into `grads`."""
    logp = F.log_softmax(logits[rows].float(), dim=-1)
    losses[rows] = -logp.gather(1, targets[:, None]).squeeze(1)
    if grads is not None:
        p = logp.exp_()
        p[torch.arange(len(rows), device=p.device), targets] -= 1.0
        grads[rows] = p


def _divergence(logits, rows, base, base_is_logp: bool, divergence: str, kl_weight: float, losses, grads) -> None:
    """`kl_weight` x the divergence from the base (its logits, or log-probabilities) at `rows` into `losses`, its
    gradient into `grads`."""
    la = F.log_softmax(logits[rows].float(), dim=-1)
    lb = base if base_is_logp else F.log_softmax(base.float(), dim=-1)
    pa, pb = la.exp(), lb.exp()
    diff = la.sub_(lb)  # la - lb (la itself is not needed again)
    value, grad = torch.zeros(len(rows), dtype=torch.float32, device=pa.device), None
    if divergence in ("forward", "symmetric"):
        value -= (pb * diff).sum(dim=-1)
        grad = pa - pb
    if divergence in ("reverse", "symmetric"):
        reverse = (pa * diff).sum(dim=-1)
        value += reverse
        toward = pa * (diff - reverse[:, None])
        grad = toward if grad is None else grad.add_(toward)
    losses[rows] = value * kl_weight
    if grads is not None:
        grads[rows] = grad.mul_(kl_weight)
