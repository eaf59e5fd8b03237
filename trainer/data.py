"""Training data: JSONL examples -> chat-formatted token ids, loss only on answers.

Each example becomes the model's chat template applied to a user turn (the
prompt) and an assistant turn (the response). Labels are -100 on the prompt
part, so the loss is computed on response tokens only. Batches are built by
length bucketing: examples of similar length share a batch, so little
compute goes to padding.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from core.errors import InvalidMessage, ModelError
from schemas.training import TrainingExample

IGNORE = -100


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    weight: float
    anchor: bool = False  # from the anchor set (see trainer/anchors.py)

    @cached_property
    def answer_length(self) -> int:
        """How many answer tokens the sequence's log-probability sums (the labels a shifted loss scores), at least 1:
        counted once per sequence, not on every step that averages over them."""
        return max(1, sum(label != IGNORE for label in self.labels[1:]))


def thin_replay(examples: list[TrainingExample], per_fact: int) -> list[TrainingExample]:
    """Keep at most `per_fact` replayed examples per earlier fact (its answer), the heaviest first; 0 keeps all.

    A version that starts from the active adapter already knows the earlier
    facts; a reminder or two each keeps them at a fraction of the cost of
    replaying every paraphrase, so a run's size grows with the facts, not
    with the paraphrases. Two (the default) rather than one: a new fact in
    the same form as an earlier one ("Which city was my brother born in?"
    after "... my sister ...") otherwise tends to overwrite it, the earlier
    fact answered with the new one's value in a wording not replayed.
    """
    if per_fact <= 0:
        return list(examples)
    reminders: Counter[str] = Counter()
    dropped = set()
    for i in sorted(range(len(examples)), key=lambda i: -examples[i].weight):
        if examples[i].source == "replay":
            fact = examples[i].response.strip()
            reminders[fact] += 1
            if reminders[fact] > per_fact:
                dropped.add(i)
    return [e for i, e in enumerate(examples) if i not in dropped]


def read_jsonl(path: Path) -> list[TrainingExample]:
    """Read a dataset file; a bad line is an error naming the line, never skipped silently."""
    from schemas.decode import decode

    examples = []
    for number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            examples.append(decode(TrainingExample, line, max_bytes=1 << 20))
        except InvalidMessage as exc:
            raise InvalidMessage(f"{path}:{number}: {exc.reason}") from None
    if not examples:
        raise InvalidMessage(f"{path}: no training examples")
    return examples


def chat_ids(tokenizer, prompt: str, response: str | None = None) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return chat_messages_ids(tokenizer, messages)


def chat_messages_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The chat template's token ids for `messages`; ending on a user turn, with the assistant's turn opened."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=messages[-1]["role"] != "assistant", tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def tokenize(tokenizer, examples: list[TrainingExample], max_len: int) -> list[Tokenized]:
    out = []
    for example in examples:
        prompt = chat_ids(tokenizer, example.prompt)
        full = chat_ids(tokenizer, example.prompt, example.response)
        if full[: len(prompt)] != prompt:
            # A template whose prompt part is not a prefix of the full chat: append the answer ourselves.
            full = prompt + tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(full) > max_len:
            full = full[:max_len]
        labels = [IGNORE] * min(len(prompt), len(full)) + full[len(prompt) :]
        if all(label == IGNORE for label in labels):
            raise ModelError(f"prompt longer than max_seq_len={max_len}: {example.prompt[:60]!r}")
        out.append(Tokenized(full, labels, example.weight, example.source == "anchor"))
    return out


def even_slices(count: int, most: int) -> list[slice]:
    """`count` rows in as few batches of at most `most` as will hold them, their sizes within one of each other.

    For generation: a step costs about as much for 110 rows as for 128, so
    440 prompts go as four batches of 110, not three of 128 and one of 56.
    """
    if count <= 0:
        return []
    batches = -(-count // most)
    size, larger = divmod(count, batches)
    slices, start = [], 0
    for index in range(batches):
        end = start + size + (1 if index < larger else 0)
        slices.append(slice(start, end))
        start = end
    return slices


def bucketed_batches(items: list[Tokenized], batch_size: int, seed: int) -> list[list[Tokenized]]:
    """Shuffle, then sort within windows of 8 batches by length; shuffle the batches."""
    rng = random.Random(seed)
    order = list(items)
    rng.shuffle(order)
    window = batch_size * 8
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda t: len(t.input_ids))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(batch: list[Tokenized], pad_id: int, device):
    """Right-padded tensors: input_ids, attention_mask, labels, weights."""
    import torch

    width = max(len(t.input_ids) for t in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    weights = torch.tensor([t.weight for t in batch], dtype=torch.float32)
    return ids.to(device), mask.to(device), labels.to(device), weights.to(device)
