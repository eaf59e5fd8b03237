"""Greedy generation with the chat template: the answers the gate, the anchors, `ask` and the demo read."""

from __future__ import annotations

from collections.abc import Sequence

from trainer.data import chat_ids, chat_messages_ids, even_slices
from trainer.loss import RowUsers, routed, users_prefix


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def generate(model, tokenizer, device, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy answer to one user prompt, with the chat template."""
    return generate_batch(model, tokenizer, device, [prompt], max_new_tokens)[0]


def generate_batch(
    model,
    tokenizer,
    device,
    prompts: list[str],
    max_new_tokens: int | Sequence[int] = 48,
    batch_size: int = 16,
    rows: RowUsers | None = None,
) -> list[str]:
    """Greedy answers to many prompts, at most `batch_size` at a time in even batches (`even_slices`), padded on
    the left of each prompt's own part, so every answer starts at the same column.

    Rows that have answered leave the batch (`greedy_shrinking`).
    `max_new_tokens`: one limit for all, or one per prompt. `rows`: prompt i
    answered through adapter `rows.users[i]` (trainer/multi.py's hooks,
    which follow the rows as they leave); with it, the prompts must be a
    single batch (`batch_size` or fewer)."""
    return generate_encoded(model, tokenizer, device, [chat_ids(tokenizer, p) for p in prompts], max_new_tokens, batch_size, rows)


def generate_chats(
    model, tokenizer, device, chats: list[list[dict[str, str]]], max_new_tokens: int = 48, batch_size: int = 16
) -> list[str]:
    """Greedy answers to whole chats (system and earlier turns included: a few-shot prompt), `batch_size` at a time."""
    return generate_encoded(
        model, tokenizer, device, [chat_messages_ids(tokenizer, c) for c in chats], max_new_tokens, batch_size
    )


def generate_encoded(
    model,
    tokenizer,
    device,
    encoded: list[list[int]],
    max_new_tokens: int | Sequence[int] = 48,
    batch_size: int = 16,
    rows: RowUsers | None = None,
) -> list[str]:
    """Greedy answers to prompts already tokenized with the chat template (`generate_batch`'s loop)."""
    import torch

    if rows is not None and len(encoded) > batch_size:
        raise ValueError("generate_batch with `rows` takes at most one batch of prompts")
    limits = per_row(max_new_tokens, len(encoded))
    pad = pad_id(tokenizer)
    answers: list[str] = []
    for part in even_slices(len(encoded), batch_size):
        batch = encoded[part]
        prefix = shared_prompt_prefix(batch)
        width = max(len(e) for e in batch)
        # The padding goes after the shared prefix: every row has it in the same columns, so it runs once.
        ids = torch.tensor([e[:prefix] + [pad] * (width - len(e)) + e[prefix:] for e in batch], device=device)
        mask = torch.tensor([[1] * prefix + [0] * (width - len(e)) + [1] * (len(e) - prefix) for e in batch], device=device)
        with torch.no_grad():
            tokens = greedy_shrinking(model, ids, mask, limits[part], stop_ids(model, tokenizer), rows, prefix)
        answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens]
    return answers


def shared_prompt_prefix(encoded: list[list[int]]) -> int:
    """How many leading tokens every prompt of a batch shares (the chat template's system turn and the start of
    the user's: about two thirds of a short question's prompt), one short of the shortest prompt; 0 when fewer
    than two prompts or tokens would share."""
    if len(encoded) < 2:
        return 0
    shared = 0
    for column in zip(*encoded):
        if any(token != column[0] for token in column):
            break
        shared += 1
    shared = min(shared, min(len(e) for e in encoded) - 1)
    return shared if shared >= 2 else 0


def per_row(max_new_tokens: int | Sequence[int], rows: int) -> list[int]:
    """Each row's answer limit: one for all, or one per row (as many as there are rows)."""
    limits = [max_new_tokens] * rows if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != rows:
        raise ValueError(f"{len(limits)} answer limits for {rows} prompts")
    return limits


def stop_ids(model, tokenizer) -> set[int]:
    """The tokens that end an answer: the generation config's end-of-sequence id(s) and the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured]) | {tokenizer.eos_token_id}
    return {int(i) for i in ids if i is not None}


def greedy_shrinking(
    model,
    ids,
    mask,
    max_new_tokens: int | Sequence[int],
    stops: set[int],
    rows: RowUsers | None = None,
    prefix: int = 0,
) -> list[list[int]]:
    """Each row's greedy answer tokens (its stop token included), rows leaving the batch as they finish.

    transformers' `generate` runs every row until the longest answer ends: in
    the gate, half the core suite's answers end within a dozen tokens and the
    rest run to the limit, and on a CPU a step of 51 rows costs 1.4x one of
    32 (benchmarks/README.md). Here a finished row's keys and values leave the cache, so later steps
    compute only the rows still answering. The same greedy choice, positions
    and mask as `generate`; each row's answer is the one it has in any batch
    up to float rounding. `max_new_tokens`: one limit, or one per row.
    `rows`: row i through adapter `rows.users[i]` (the hooks are narrowed
    as rows leave). `prefix`: the first columns hold the same tokens in
    every row (`shared_prompt_prefix`; padding only after them): they go
    through the model once per adapter, their keys and values shared by
    the rows, as the training loss does it (trainer/loss.py)."""
    from transformers import DynamicCache

    users = rows.users if rows is not None else (0,) * ids.shape[0]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache(config=model.config)
    if prefix:

        def run(x, past):
            return model(input_ids=x, past_key_values=past, use_cache=True, logits_to_keep=1)

        cache = users_prefix(run, ids[:, :prefix], users, rows, model.config).for_rows(range(ids.shape[0]))
    with routed(rows, users) as narrow:
        logits = model(
            input_ids=ids[:, prefix:],
            attention_mask=mask,
            position_ids=positions[:, prefix:],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        return _decode(model, logits, cache, (mask, positions[:, -1:]), per_row(max_new_tokens, ids.shape[0]), stops, narrow)


def _decode(model, logits, cache, at: tuple, limits: list[int], stops: set[int], narrow) -> list[list[int]]:
    """The greedy steps after the prompt (`at`: the mask so far and each row's last position)."""
    import torch

    mask, last = at
    answers: list[list[int]] = [[] for _ in range(len(limits))]
    alive = torch.arange(len(limits), device=mask.device)
    for step in range(max(limits)):
        chosen = logits[:, -1, :].float().argmax(dim=-1)
        kept = alive.tolist()
        for row, token in zip(kept, chosen.tolist()):
            answers[row].append(token)
        going = torch.tensor(
            [token not in stops and step + 1 < limits[row] for row, token in zip(kept, chosen.tolist())], device=mask.device
        )
        if not bool(going.any()):
            break
        if not bool(going.all()):
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            if narrow is not None:
                narrow(keep.tolist())
            alive, chosen, mask, last = alive[keep], chosen[keep], mask[keep], last[keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        last = last + 1
        logits = model(
            input_ids=chosen[:, None], attention_mask=mask, position_ids=last, past_key_values=cache, use_cache=True
        ).logits
    return answers
