"""Preference training: DPO on corrected answers, KTO on rated ones, beside the supervised loss.

    items = preference_items(tokenizer, examples, max_len)        # pairs and rated answers
    reference = reference_logps(peft_model, items, pad, device)   # once per run, from the run's starting weights
    loss = preference_loss(peft_model, batch, reference, PreferenceLoss(beta), pad, device)

A correction is a pair: the user's correction (chosen) is preferred to the
answer the assistant gave (rejected), so DPO's loss (Rafailov et al. 2023,
TRL's `sigmoid` loss) pushes the log-likelihood gain of the chosen answer over
the reference above the rejected one's. A rating is one answer, liked or not:
KTO's loss (Ethayarajh et al. 2024, TRL's `kto` loss) pushes a liked answer's
gain above, and a disliked one's below, an estimate of the policy's KL from
the reference (mismatched prompt/answer pairs: each rated answer after the
next one's prompt). The reference is where the run starts: the user's active
version on a warm start, else the base model, so the learning-without-
forgetting machinery (anchors' KL, early stopping, shrink, the time budget)
works on these steps as on the supervised ones. `dpo_losses` and
`kto_losses` are tested against TRL's own functions' values
(tests/trainer/data/preference_reference.json, scripts/trl_reference_values.py).

KTO's log-ratios are averaged over an answer's tokens (length-normalized as
SimPO's; `PreferenceLoss.kto_token_beta`, training.preference_kto_token_beta)
or, with that setting 0, summed as TRL's: a summed ratio of a long answer
saturates the sigmoid after a small change per token, so the long answers a
user dislikes stop teaching early; averaged, every answer is pushed as far per
token (benchmarks/README.md: the short-answer user's answers shorten more).
The gate compares held-out rated answers in the same currency
(`preference_accuracy`): their gain per token when KTO learns per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.training import TrainingExample
from trainer.data import Tokenized, tokenize
from trainer.frozen import FrozenBelow

OBJECTIVES = ("sft", "sft+preference", "auto")


def uses_preference(objective: str, examples: list[TrainingExample]) -> bool:
    """Whether a run trains with the preference objective: asked for, or (auto) the data holds pairs or ratings."""
    if objective == "sft":
        return False
    return any(e.preference for e in examples)


def supervised(examples: list[TrainingExample], objective: str) -> list[TrainingExample]:
    """The supervised targets: everything but rated answers, and with `sft` alone the liked ones too (a disliked
    answer is never a target)."""
    sft_only = not uses_preference(objective, examples)
    return [e for e in examples if not e.rated_answer or (sft_only and (e.rating or 0) > 0)]


def dpo_losses(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float):
    """Per pair: -log sigmoid(beta * (chosen's log-ratio - rejected's)) (sequence log-probabilities in)."""
    import torch.nn.functional as F

    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin)


def kl_estimate(policy_mismatched, reference_mismatched):
    """KTO's reference point: the policy's mean log-ratio on mismatched pairs, no gradient, at least 0."""
    return (policy_mismatched - reference_mismatched).mean().detach().clamp(min=0)


def kto_losses(policy, reference, desirable, kl, beta: float):
    """Per rated answer: 1 - sigmoid(beta * (log-ratio - kl)) if liked, 1 - sigmoid(beta * (kl - log-ratio)) if not."""
    import torch

    ratio = policy - reference
    return 1 - torch.sigmoid(beta * torch.where(desirable, ratio - kl, kl - ratio))


@dataclass(frozen=True)
class PreferenceLoss:
    """How a preference batch's losses are weighed (training.preference_* settings)."""

    beta: float = 0.1  # DPO's beta; KTO's too on summed log-ratios
    undesirable_weight: float = 1.0  # KTO's lambda_U: a disliked answer's loss against a liked one's
    kto_token_beta: float = 0.0  # above 0: KTO on log-ratios averaged over each answer's tokens, with this beta

    @property
    def per_token(self) -> bool:
        """Whether rated answers' gains are learned per answer token (and so compared at the gate)."""
        return self.kto_token_beta > 0


def answer_tokens(sequences: list[Tokenized], device):
    """How many answer tokens each sequence's log-probability sums (`sequence_logps` turns its mean into the sum by it)."""
    import torch

    return torch.tensor([s.answer_length for s in sequences], device=device)


@dataclass(frozen=True)
class PreferenceItem:
    """What one example gives the preference loss: (chosen, rejected) for a pair, (answer, mismatched) for a rating."""

    sequences: tuple[Tokenized, Tokenized]
    desirable: bool | None  # None: a pair
    weight: float


def preference_items(tokenizer, examples: list[TrainingExample], max_len: int) -> list[PreferenceItem]:
    """Pairs and rated answers, tokenized; each rated answer's mismatched sequence is its answer after the next
    rated answer's prompt (KTO's KL estimate)."""
    pairs = [e for e in examples if e.rejected is not None]
    rated = [e for e in examples if e.rejected is None and e.rating]
    items = []
    for e in pairs:
        rejected = e.model_copy(update={"response": e.rejected})
        chosen_seq, rejected_seq = tokenize(tokenizer, [e, rejected], max_len)
        items.append(PreferenceItem((chosen_seq, rejected_seq), None, e.weight))
    for n, e in enumerate(rated):
        other = rated[(n + 1) % len(rated)]
        mismatched = e.model_copy(update={"prompt": other.prompt}) if len(rated) > 1 else e
        answer, off = tokenize(tokenizer, [e, mismatched], max_len)
        items.append(PreferenceItem((answer, off), bool(e.rating and e.rating > 0), e.weight))
    return items


def sequence_logps(peft_model, sequences: list[Tokenized], pad: int, device, below: FrozenBelow | None = None):
    """Each sequence's log-probability of its answer tokens, summed (the fast path of trainer/loss.py)."""
    import torch

    from trainer.data import collate
    from trainer.loss import answer_losses

    ids, mask, labels, _ = collate(sequences, pad, device)
    ones = torch.ones(ids.shape[0], device=ids.device)
    _, mean_nll = answer_losses(peft_model, ids, mask, labels, ones, below=below)
    return -mean_nll * answer_tokens(sequences, ids.device)  # each row's mean back to its sum


def reference_logps(
    peft_model, items: list[PreferenceItem], pad: int, device, below: FrozenBelow | None = None, batch_size: int = 16
) -> dict[int, float]:
    """The reference's log-probability of every sequence of `items`, keyed by id(sequence): computed once per run
    from the weights the run starts with, in eval mode (no dropout)."""
    import torch

    sequences = sorted((s for item in items for s in item.sequences), key=lambda s: len(s.input_ids))
    was_training = peft_model.training
    peft_model.eval()
    with torch.no_grad():
        logps = _chunked_logps(peft_model, sequences, pad, device, below, batch_size)
    peft_model.train(was_training)
    return {id(seq): logp for seq, logp in zip(sequences, logps, strict=True)}


def preference_loss(
    peft_model, batch: list[PreferenceItem], reference: dict[int, float], losses: PreferenceLoss, pad: int, device, below=None
):
    """The weighted mean DPO/KTO loss of a batch of preference items (one forward pass for all their sequences);
    a disliked answer's loss counts `losses.undesirable_weight` times (KTO's lambda_U, relative to a liked one's)."""
    import torch

    pairs = [item for item in batch if item.desirable is None]
    rated = [item for item in batch if item.desirable is not None]
    # One pass with gradients for what the losses learn from: both sides of a pair, a rated answer itself; the
    # mismatched answers only set KTO's reference point, which carries no gradient: a pass without one.
    learned = [s for item in pairs for s in item.sequences] + [item.sequences[0] for item in rated]
    policy = sequence_logps(peft_model, learned, pad, device, below)
    parts = []
    if pairs:
        p = policy[: 2 * len(pairs)].view(len(pairs), 2)
        r = torch.tensor([[reference[id(s)] for s in item.sequences] for item in pairs], device=policy.device)
        parts.append(dpo_losses(p[:, 0], p[:, 1], r[:, 0], r[:, 1], losses.beta))
    if rated:
        with torch.no_grad():
            mismatched = sequence_logps(peft_model, [item.sequences[1] for item in rated], pad, device, below)
        parts.append(_rated_losses(rated, policy[2 * len(pairs) :], mismatched, reference, losses))
    weights = torch.tensor([item.weight for item in pairs + rated], device=policy.device)
    return (torch.cat(parts) * weights).sum() / weights.sum()


def _rated_losses(rated: list[PreferenceItem], policy, mismatched, reference, losses: PreferenceLoss):
    """KTO's loss of each rated answer (its log-probability `policy`; its mismatched sequence's `mismatched`), summed
    or per token (`losses.kto_token_beta`), a disliked one's weighted."""
    import torch

    ref = torch.tensor([[reference[id(s)] for s in item.sequences] for item in rated], device=policy.device)
    beta, answers, others = losses.beta, ref[:, 0], ref[:, 1]
    if losses.per_token:
        beta = losses.kto_token_beta
        tokens = answer_tokens([item.sequences[0] for item in rated], policy.device)
        other_tokens = answer_tokens([item.sequences[1] for item in rated], policy.device)
        policy, answers = policy / tokens, answers / tokens
        mismatched, others = mismatched / other_tokens, others / other_tokens
    kl = kl_estimate(mismatched, others)
    desirable = torch.tensor([bool(item.desirable) for item in rated], device=policy.device)
    kto = kto_losses(policy, answers, desirable, kl, beta)
    # Scaled apart from the examples' weights (which normalize the batch), so that a batch of disliked answers
    # alone is down-weighted too.
    return torch.where(desirable, kto, kto * losses.undesirable_weight)


# ---- the gate's judgement ------------------------------------------------------------ #

_MOST_PAIRS = 64  # held-out liked x disliked answers compared, at most


def held_out_pairs(examples: list[TrainingExample]) -> list[tuple[TrainingExample, TrainingExample]]:
    """(preferred, other) to compare: each pair's correction and the answer it corrected, and every held-out liked
    rated answer against every disliked one (in order, at most `_MOST_PAIRS`)."""
    out = [(e, e.model_copy(update={"response": e.rejected})) for e in examples if e.rejected is not None]
    liked = [e for e in examples if e.rated_answer and (e.rating or 0) > 0]
    disliked = [e for e in examples if e.rated_answer and (e.rating or 0) < 0]
    out += [(good, bad) for good in liked for bad in disliked]
    return out[:_MOST_PAIRS]


def preference_accuracy(
    model, tokenizer, device, candidate_dir, reference_dir, examples, rated_per_token: bool = False, max_len: int = 512
):
    """(accuracy, pairs): the share of `held_out_pairs` whose preferred answer gains more log-likelihood over the
    reference (the user's active version, or the base model) than the other under the candidate; None without pairs.

    The gain, not the likelihood itself: a long answer is less likely than a short one whatever was learned. A
    correction's pair is compared by its summed gain, as DPO learns it; rated answers by theirs per answer token
    when `rated_per_token` (as per-token KTO learns them): they answer different prompts at different lengths, and
    summed, a long answer's gain outweighs a short one's whichever way each moved."""
    pairs = held_out_pairs(examples)
    if not pairs:
        return None, 0
    # Each held-out answer is in several pairs: its log-probabilities are computed once.
    answers = list(dict.fromkeys((e.prompt, e.response) for pair in pairs for e in pair))
    sequences = tokenize(tokenizer, [TrainingExample(prompt=p, response=r) for p, r in answers], max_len)
    after = _logps_with(model, candidate_dir, sequences, tokenizer, device)
    before = _logps_with(model, reference_dir, sequences, tokenizer, device)
    per_token = {(e.prompt, e.response) for e in examples if e.rated_answer} if rated_per_token else set()
    gain = {
        answer: (a - b) / (seq.answer_length if answer in per_token else 1)
        for answer, a, b, seq in zip(answers, after, before, sequences, strict=True)
    }
    wins = sum(gain[(good.prompt, good.response)] > gain[(bad.prompt, bad.response)] for good, bad in pairs)
    return round(wins / len(pairs), 4), len(pairs)


def _logps_with(model, adapter_dir, sequences: list[Tokenized], tokenizer, device) -> list[float]:
    """Each sequence's answer log-probability under the base model plus the adapter (None: the base model alone)."""
    import torch

    from trainer.generation import pad_id
    from trainer.lora import adapter_applied

    with adapter_applied(model, adapter_dir) as adapted, torch.no_grad():
        return _chunked_logps(adapted, sequences, pad_id(tokenizer), device)


def _chunked_logps(model, sequences: list[Tokenized], pad: int, device, below=None, batch_size: int = 16) -> list[float]:
    out: list[float] = []
    for start in range(0, len(sequences), batch_size):
        out += sequence_logps(model, sequences[start : start + batch_size], pad, device, below).tolist()
    return out
