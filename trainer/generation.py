"""Greedy generation with the chat template: the answers the gate, the anchors, `ask` and the demo read."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from trainer.data import chat_ids, chat_messages_ids


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
    narrow: Callable[[Sequence[int]], None] | None = None,
) -> list[str]:
    """Greedy answers to many prompts, `batch_size` at a time (left-padded, so every answer starts at the same column).

    Rows that have answered leave the batch (`greedy_shrinking`).
    `max_new_tokens`: one limit for all, or one per prompt. `narrow`: told
    which rows go on whenever some leave (the forward hooks that route rows
    to their users' adapters by index, trainer/multi.py); with it, the
    prompts must be a single batch (`batch_size` or fewer)."""
    return generate_encoded(
        model, tokenizer, device, [chat_ids(tokenizer, p) for p in prompts], max_new_tokens, batch_size, narrow
    )


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
    narrow: Callable[[Sequence[int]], None] | None = None,
) -> list[str]:
    """Greedy answers to prompts already tokenized with the chat template (`generate_batch`'s loop)."""
    import torch

    if narrow is not None and len(encoded) > batch_size:
        raise ValueError("generate_batch with `narrow` takes at most one batch of prompts")
    limits = per_row(max_new_tokens, len(encoded))
    pad = pad_id(tokenizer)
    answers: list[str] = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(len(e) for e in batch)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in batch], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in batch], device=device)
        with torch.no_grad():
            rows = greedy_shrinking(model, ids, mask, limits[start : start + batch_size], stop_ids(model, tokenizer), narrow)
        answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]
    return answers


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
    narrow: Callable[[Sequence[int]], None] | None = None,
) -> list[list[int]]:
    """Each row's greedy answer tokens (its stop token included), rows leaving the batch as they finish.

    transformers' `generate` runs every row until the longest answer ends: in
    the gate, half the core suite's answers end within a dozen tokens and the
    rest run to the limit, and on a CPU a step of 51 rows costs 1.4x one of
    32 (benchmarks/README.md). Here a finished row's keys and values leave the cache, so later steps
    compute only the rows still answering. The same greedy choice, positions
    and mask as `generate`; each row's answer is the one it has in any batch
    up to float rounding. `max_new_tokens`: one limit, or one per row."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1
    ).logits
    limits = per_row(max_new_tokens, ids.shape[0])
    answers: list[list[int]] = [[] for _ in range(ids.shape[0])]
    alive = torch.arange(ids.shape[0], device=ids.device)
    last = positions[:, -1:]
    for step in range(max(limits)):
        chosen = logits[:, -1, :].float().argmax(dim=-1)
        rows = alive.tolist()
        for row, token in zip(rows, chosen.tolist()):
            answers[row].append(token)
        going = torch.tensor(
            [token not in stops and step + 1 < limits[row] for row, token in zip(rows, chosen.tolist())], device=ids.device
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
