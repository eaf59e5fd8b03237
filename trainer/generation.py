"""Greedy generation with the chat template: the answers the gate, the anchors, `ask` and the demo read."""

from __future__ import annotations

from trainer.data import chat_ids


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def generate(model, tokenizer, device, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy answer to one user prompt, with the chat template."""
    return generate_batch(model, tokenizer, device, [prompt], max_new_tokens)[0]


def generate_batch(model, tokenizer, device, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 16) -> list[str]:
    """Greedy answers to many prompts, `batch_size` at a time (left-padded, so every answer starts at the same column)."""
    import torch

    pad = pad_id(tokenizer)
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [chat_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(e) for e in encoded)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return answers
