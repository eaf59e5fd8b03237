"""The training loss: cross-entropy on the user's answers, KL to the base model on the anchors.

    total, per_row = answer_losses(peft_model, ids, mask, labels, weights, anchor_rows, base_hidden, kl_weight)

Two things make it cheap on a small model: the rows of a batch share a long
prefix (the chat template), which runs once (`predicting_states`), and the
output projection runs only where an answer token is predicted. The base
model's side of the anchor KL is computed once per run
(`base_answer_states`), not in a second forward pass at every step.
`weighted_loss` is the plain full-logits reference the fast path is tested
against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from core.errors import ModelError
from trainer.frozen import FrozenBelow


@dataclass(frozen=True)
class RowUsers:
    """Several users trained in one batch (trainer/multi.py): whose adapter each row goes through.

    `through(users)` is a context in which row i of a forward pass goes
    through the adapter of `users[i]`; it yields `narrow(kept)`, which keeps
    only those rows (generation drops the rows that have answered)."""

    users: tuple[int, ...]
    through: Callable[[Sequence[int]], AbstractContextManager]


def routed(rows: RowUsers | None, users: Sequence[int]) -> AbstractContextManager:
    """`rows.through(users)` (it yields `narrow`), or a context that does nothing (and yields None) without `rows`."""
    return nullcontext() if rows is None else rows.through(users)


def weighted_loss(logits, labels, weights):
    """Mean over each example's response tokens, then weighted across examples (full logits: the reference)."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    per_token = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
    mask = (shift_labels != -100).float()
    per_example = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return (per_example * weights).sum() / weights.sum()


def shared_prefix_len(ids, mask, labels) -> int:
    """How many leading tokens every row of the batch shares, none of them an answer position.

    Capped one short of the first answer token, so the shared part never has
    to predict anything itself.
    """
    same = ((ids == ids[:1]) & (mask == 1)).all(dim=0)
    common = int(same.int().cumprod(0).sum())
    answered = (labels != -100).any(dim=0).nonzero()
    first_answer = int(answered[0]) if len(answered) else ids.shape[1]
    return max(0, min(common, first_answer - 1))


def predicting_states(decoder, ids, mask, labels, rows: RowUsers | None = None, below: FrozenBelow | None = None):
    """(hidden, targets): the decoder's last hidden states at each position and the token each predicts.

    The rows of a batch share a long prefix (the chat template's system turn
    and the start of the user turn: 35% of the benchmark's tokens), so that
    prefix goes through the model once, as a batch of one, and its keys and
    values are broadcast to every row; only the rest is computed per row.
    Gradients flow through the broadcast cache into the prefix's LoRA
    weights, so the loss and its gradient are the full batch's, up to float
    rounding (the prefix shares one dropout mask across rows). With `rows`
    (several users' adapters), the prefix goes through once per user and each
    row gets its own user's keys and values, and the rest goes in groups of
    rows of similar length (`length_groups`), each padded to its own longest
    row, not to the batch's. With `below` (trainer/frozen.py),
    the layers under the adapters are not run again for a row they have seen:
    the pass starts at the first adapted layer.
    """
    if below is None:
        inputs = ids

        def through_layers(x, m, past):
            return decoder(input_ids=x, attention_mask=m, past_key_values=past, use_cache=past is not None).last_hidden_state

    else:
        inputs, through_layers = below.inputs(ids, mask), below.above
    users = rows.users if rows is not None else (0,) * ids.shape[0]
    prefix = shared_prefix_len(ids, mask, labels) if ids.shape[0] > 1 else 0
    if prefix < 2:
        with routed(rows, users):
            return through_layers(inputs, mask, None)[:, :-1, :], labels[:, 1:]
    shared = users_prefix(lambda x, past: through_layers(x, None, past), inputs[:, :prefix], users, rows, decoder.config)
    hidden = _above_prefix(through_layers, inputs, mask, shared, prefix, users, rows)
    return hidden[:, :-1, :], labels[:, prefix + 1 :]


@dataclass(frozen=True)
class UsersPrefix:
    """A prefix every row shares, run once per user: its keys and values, and each row's place among them."""

    cache: object  # a DynamicCache of one row per user
    position: list[int] | None  # row -> its user's row in `cache`; None when every row's user is the same
    config: object
    device: object

    def for_rows(self, picked: Sequence[int]):
        """A DynamicCache holding the prefix's keys and values for rows `picked` (indices into the batch)."""
        import torch
        from transformers import DynamicCache

        index = None if self.position is None else torch.tensor([self.position[r] for r in picked], device=self.device)
        spread = [_spread(layer, len(picked), index) for layer in self.cache.layers]
        return DynamicCache(ddp_cache_data=spread, config=self.config)


def users_prefix(run, prefix_inputs, users: Sequence[int], rows: RowUsers | None, config) -> UsersPrefix:
    """`run(inputs, cache)` on the shared prefix (`prefix_inputs`: every row's, the same) once per user, each
    through its own adapter (`rows`; None: one model for all), filling a DynamicCache."""
    from transformers import DynamicCache

    firsts = sorted({u: i for i, u in reversed(list(enumerate(users)))}.values())  # each user's first row
    cache = DynamicCache(config=config)
    with routed(rows, [users[i] for i in firsts]):
        run(prefix_inputs[firsts], cache)
    position = [{users[i]: n for n, i in enumerate(firsts)}[u] for u in users] if len(firsts) > 1 else None
    return UsersPrefix(cache, position, config, prefix_inputs.device)


def _above_prefix(through_layers, inputs, mask, shared: UsersPrefix, prefix: int, users, rows: RowUsers | None):
    """Every row's states after the prefix, each length group (`length_groups`) padded to its own longest row
    and given its users' prefix keys and values (`shared`)."""
    import torch
    import torch.nn.functional as F

    lengths, device = [int(n) for n in mask.sum(dim=1)], mask.device
    parts, order = [], []
    for group in length_groups(lengths, users):
        picked, width = torch.tensor(group, device=device), max(lengths[r] for r in group)
        with routed(rows, [users[r] for r in group]):
            part = through_layers(inputs[picked, prefix:width], mask[picked, :width], shared.for_rows(group))
        parts.append(F.pad(part, (0, 0, 0, mask.shape[1] - width)))  # zeros where the group had no token (no answer there)
        order += group
    hidden = torch.cat(parts)
    if order != sorted(order):  # back to the batch's row order
        hidden = hidden[torch.tensor(order).argsort().to(device)]
    return hidden


# Rows a length group holds at least: a batch of one user's rows (bucketed by length already) stays one group.
_GROUP_ROWS = 8


def length_groups(lengths: Sequence[int], users: Sequence[int]) -> list[list[int]]:
    """The rows (indices) in groups of similar length, each user's rows next to each other inside a group.

    A batched run's step joins every user's batch, each bucketed by length
    alone, so one width for all of them paid for 36% padding in the layers
    above the shared prefix (eight users of the scale benchmark); groups of
    at least `_GROUP_ROWS` rows, each padded to its own longest, pay 7%.
    """
    by_length = sorted(range(len(lengths)), key=lambda r: lengths[r])
    count = max(1, len(by_length) // _GROUP_ROWS)
    groups = [by_length[g * len(by_length) // count : (g + 1) * len(by_length) // count] for g in range(count)]
    return [sorted(group, key=lambda r: (users[r], r)) for group in groups]


def _spread(layer, rows: int, index):
    """A cache layer's prefix keys and values for every row: the one prefix expanded, or each row's user's picked
    by `index`; (None, None) for a layer the pass did not reach (below the adapters, see `FrozenBelow`)."""
    if not layer.is_initialized:
        return None, None
    if index is None:
        return layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1)
    return layer.keys.index_select(0, index), layer.values.index_select(0, index)


# The base log-probabilities a run keeps at most: positions x vocabulary x 4 bytes, about 200 KB per anchor
# position on the default model (eight users' distinct anchors: about 0.7 GB). Past it, the base states are
# kept instead (a few KB per anchor) and projected to the vocabulary at every step.
KEPT_LOG_PROBS_BYTES = 2 << 30


@dataclass(frozen=True)
class BaseAnswers:
    """The base model's side of the anchor KL at each anchor's answer positions, keyed by id(item): its
    log-probabilities over the vocabulary (`logp`: they fit `KEPT_LOG_PROBS_BYTES`), else its last hidden states."""

    per_item: dict[int, object]
    logp: bool

    def __bool__(self) -> bool:
        return bool(self.per_item)

    def for_rows(self, items) -> dict[str, object]:
        """`answer_losses`' keyword for the anchors among `items`, in row order (`base_logp` or `base_hidden`);
        {} when none is an anchor."""
        import torch

        anchored = [self.per_item[id(t)] for t in items if t.anchor]
        if not anchored:
            return {}
        return {"base_logp" if self.logp else "base_hidden": torch.cat(anchored)}

    def shared(self, alias: dict[int, int]) -> BaseAnswers:
        """The same answers under other keys (`alias`: new key -> existing key): one tensor for items alike."""
        return BaseAnswers({new: self.per_item[old] for new, old in alias.items()}, self.logp)


def base_answer_states(
    causal_lm, items, pad_id: int, device, batch_size: int = 8, below: FrozenBelow | None = None
) -> BaseAnswers:
    """The base model's side of the anchor KL at each answer-predicting position of `items` (`BaseAnswers`).

    Anchors are held to the base model's next-token distribution at these
    positions. The base model never changes during a run, so that
    distribution is computed once here instead of in a second forward pass
    at every step (a fifth of a step's time), and, where it fits
    `KEPT_LOG_PROBS_BYTES`, projected to the vocabulary once too (the
    projection and its log-softmax were 0.18 s of a 3.7 s step of eight
    users' rows); else the loss projects the states when it needs them.
    With `below`, the anchors' lower layers are computed here once for the
    training steps too.
    """
    import torch

    from trainer.data import collate
    from trainer.head_loss import base_log_probs

    decoder = causal_lm.model
    states: dict[int, object] = {}
    ordered = sorted(items, key=lambda t: len(t.input_ids))
    was_training = decoder.training
    decoder.eval()  # the distribution the base model answers with: no dropout
    with torch.no_grad():
        for start in range(0, len(ordered), batch_size):
            batch = ordered[start : start + batch_size]
            ids, mask, labels, _ = collate(batch, pad_id, device)
            hidden, targets = predicting_states(decoder, ids, mask, labels, below=below)
            for row, item in enumerate(batch):
                states[id(item)] = hidden[row][targets[row] != -100]
    decoder.train(was_training)
    positions = sum(int(s.shape[0]) for s in states.values())
    if positions * causal_lm.lm_head.weight.shape[0] * 4 > KEPT_LOG_PROBS_BYTES:
        return BaseAnswers(states, logp=False)
    projected = {key: base_log_probs(causal_lm.lm_head, s) for key, s in states.items()}
    if any(p is None for p in projected.values()):
        return BaseAnswers(states, logp=False)
    return BaseAnswers(projected, logp=True)


def answer_losses(
    peft_model,
    ids,
    mask,
    labels,
    weights,
    anchor_rows=None,
    base_hidden=None,
    kl_weight: float = 0.0,
    divergence: str = "symmetric",
    rows: RowUsers | None = None,
    below: FrozenBelow | None = None,
    base_logp=None,
):
    """(total, per_row): the weighted loss the optimizer sees, and each row's own loss.

    The output projection (hidden x vocabulary: 576 x 49,152 for SmolLM2-135M)
    is a large share of a small model's compute, and with the loss on answers
    only, most positions' logits would be thrown away: it runs only where an
    answer token is predicted.

    With `kl_weight` > 0, the rows in `anchor_rows` (the anchor set's general
    prompts) are scored by a KL divergence from the base model's whole
    next-token distribution at each answer position (`base_hidden`: the base
    model's states there, or `base_logp`: its log-probabilities there, from
    `base_answer_states`, in row order) times `kl_weight`, instead of cross-entropy on the base model's greedy answer:
    the adapter is held to the base model's distribution there, not just to
    its top token.

    `peft_model`: a PEFT model, or (with `rows`: several users in one batch)
    the base model with trainer/multi.py's hooks on it. `below`: see
    `predicting_states`.
    """
    import torch

    from trainer.head_loss import head_losses

    causal_lm = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    # (Dropping the mask on these right-padded batches gives the same loss but
    # measured 1.32x/1.36x against 1.41x with it, so the mask stays.)
    hidden, targets = predicting_states(causal_lm.model, ids, mask, labels, rows, below)
    keep = targets != -100
    rows = keep.nonzero(as_tuple=True)[0]
    anchor_tokens = None
    if kl_weight > 0 and anchor_rows is not None and bool(anchor_rows.any()):
        anchor_tokens = anchor_rows[rows]  # row-major order, as in hidden[keep]
        base = base_logp if base_logp is not None else base_hidden
        if base is None or base.shape[0] != int(anchor_tokens.sum()):
            raise ModelError("anchor rows need the base model's states at each of their answer positions")
    per_token = head_losses(
        causal_lm.lm_head, hidden[keep], targets[keep], anchor_tokens, base_hidden, kl_weight, divergence, base_logp
    )
    sums = torch.zeros(ids.shape[0], device=ids.device).index_add_(0, rows, per_token)
    per_row = sums / keep.sum(dim=1).clamp(min=1)
    return (per_row * weights).sum() / weights.sum(), per_row


def answer_only_loss(
    peft_model,
    ids,
    mask,
    labels,
    weights,
    anchor_rows=None,
    base_hidden=None,
    kl_weight: float = 0.0,
    divergence: str = "symmetric",
):
    """The weighted loss alone (see `answer_losses`)."""
    return answer_losses(peft_model, ids, mask, labels, weights, anchor_rows, base_hidden, kl_weight, divergence)[0]


def loss_parts(per_row, weights, anchor_rows, kl_weight: float) -> tuple[float | None, float | None]:
    """(user loss, anchor KL) of one step: the weighted mean cross-entropy of the user's rows and the mean
    KL of the anchor rows (without its weight), each None when the batch has no such row. Recorded and
    drawn apart: their sum zig-zags with the batch's mix of rows and says little about learning."""
    import torch

    anchors = anchor_rows if anchor_rows is not None else torch.zeros_like(per_row, dtype=torch.bool)
    parts: list[float | None] = []
    for rows, scale in ((~anchors, 1.0), (anchors, kl_weight if kl_weight > 0 else 1.0)):
        if not bool(rows.any()):
            parts.append(None)
            continue
        w = weights[rows]
        parts.append(round(float((per_row[rows].detach() * w).sum() / w.sum()) / scale, 5))
    return parts[0], parts[1]
