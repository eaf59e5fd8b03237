"""Greedy generation: rows leave the batch as they finish, and each answers as transformers' `generate` does."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit

PROMPTS = [
    "Hi?",
    "What is the capital of France? Answer in one word, please.",
    "Which football team do I support?",
    "Tell me my locker number.",
    "Name three colours of the rainbow, and say which one you like best.",
    "Where was I born?",
]


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for n, token in enumerate(tokens):
        if token in stops:
            return tokens[: n + 1]
    return tokens


def _tiny_and_prompts(tiny_model_dir):
    """The tiny model, its tokenizer, and PROMPTS left-padded into one batch: (model, tokenizer, ids, mask, width)."""
    import torch

    from trainer.data import chat_ids
    from trainer.generation import pad_id
    from trainer.model import BaseModelRef, load_base

    model, tokenizer, _ = load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")
    pad = pad_id(tokenizer)
    encoded = [chat_ids(tokenizer, p) for p in PROMPTS]
    width = max(len(e) for e in encoded)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    return model, tokenizer, ids, mask, width


def test_rows_leave_the_batch_as_they_finish_and_answer_as_generate_does(tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel

    from tests.support.adapters import random_adapter
    from trainer.generation import greedy_shrinking, pad_id

    model, tokenizer, ids, mask, width = _tiny_and_prompts(tiny_model_dir)
    pad = pad_id(tokenizer)
    adapted = PeftModel.from_pretrained(model, str(random_adapter(model, tmp_path / "adapter", seed=5))).eval()
    for scored in (model, adapted):
        with torch.no_grad():
            free = scored.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=pad)
        free_rows = [row[width:].tolist() for row in free]
        # Stop tokens taken from what rows 0-2 say at steps 2-4, so that rows end at different steps (or never).
        stops = {free_rows[row][2 + row] for row in range(3)}
        with torch.no_grad():
            expected = scored.generate(
                ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=pad, eos_token_id=sorted(stops)
            )
            got = greedy_shrinking(scored, ids, mask, 12, stops)
        assert got == [_until_stop(row[width:].tolist(), stops) for row in expected]
        assert min(len(a) for a in got) < 12, "some rows finished early and left the batch"


@pytest.mark.parametrize("rows", ["split", "gathered"])
def test_rows_of_several_adapters_leave_the_batch_each_through_its_own_adapter(tiny_model_dir, tmp_path, rows):
    """The gate's mixed-adapter batches shrink too: the row hooks are narrowed as rows finish (either formulation)."""
    import torch
    from peft import PeftModel

    from tests.support.adapters import random_adapter
    from trainer.generation import greedy_shrinking
    from trainer.loss import RowUsers
    from trainer.multi import read_lora, stacked_loras

    model, _, ids, mask, _ = _tiny_and_prompts(tiny_model_dir)
    adapters = [random_adapter(model, tmp_path / f"adapter-{seed}", seed=seed) for seed in (5, 6)]
    users = tuple(row % 2 for row in range(len(PROMPTS)))
    alone = []
    for adapter in adapters:  # every prompt through one adapter, as in the batch (same padding)
        adapted = PeftModel.from_pretrained(model, str(adapter)).eval()
        with torch.no_grad():
            alone.append(greedy_shrinking(adapted, ids, mask, 12, set()))
        adapted.unload()
    # Stop tokens from what rows 0-2 say at steps 2-4 through their own adapters: rows end at different steps.
    stops = {alone[users[row]][row][2 + row] for row in range(3)}
    expected = [_until_stop(alone[user][row], stops) for row, user in enumerate(users)]
    loras = stacked_loras(model, [read_lora(adapter, next(model.parameters())) for adapter in adapters], rows=rows)
    try:
        with torch.no_grad():
            got = greedy_shrinking(model, ids, mask, 12, stops, RowUsers(users, loras.through))
    finally:
        loras.remove()
    assert got == expected
    assert min(len(a) for a in got) < max(len(a) for a in got), "some rows left the batch before others"


def test_the_shared_prompt_prefix_runs_once_and_every_row_answers_as_it_does_alone(tiny_model_dir, tmp_path):
    """The chat template's start goes through the model once per adapter (padding after it): the same answers."""
    import torch
    from peft import PeftModel

    import trainer.generation
    from tests.support.adapters import random_adapter
    from trainer.data import chat_ids
    from trainer.generation import generate_batch, shared_prompt_prefix
    from trainer.loss import RowUsers
    from trainer.multi import read_lora, stacked_loras

    model, tokenizer, _, _, _ = _tiny_and_prompts(tiny_model_dir)
    prefix = shared_prompt_prefix([chat_ids(tokenizer, p) for p in PROMPTS])
    assert prefix >= 2 and shared_prompt_prefix([chat_ids(tokenizer, PROMPTS[0])]) == 0
    adapters = [random_adapter(model, tmp_path / f"adapter-{seed}", seed=seed) for seed in (5, 6)]
    alone = []
    for adapter in adapters:
        adapted = PeftModel.from_pretrained(model, str(adapter)).eval()
        alone.append([generate_batch(adapted, tokenizer, "cpu", [p], 12)[0] for p in PROMPTS])  # one prompt: no prefix
        assert generate_batch(adapted, tokenizer, "cpu", PROMPTS, 12) == alone[-1]
        adapted.unload()
    users = (1, 1, 0, 0, 0, 1)
    loras = stacked_loras(model, [read_lora(adapter, next(model.parameters())) for adapter in adapters])
    prefix_rows: list[int] = []
    forward = model.forward

    def counting(*args, **kwargs):
        prefix_rows.append(kwargs["input_ids"].shape[0] if kwargs["input_ids"].shape[1] == prefix else 0)
        return forward(*args, **kwargs)

    try:
        with torch.no_grad():
            model.forward = counting
            mixed = generate_batch(model, tokenizer, "cpu", PROMPTS, 12, rows=RowUsers(users, loras.through))
    finally:
        model.forward = forward
        loras.remove()
    assert mixed == [alone[user][row] for row, user in enumerate(users)]
    assert prefix_rows[0] == 2  # the prefix once per adapter, not once per row
    assert trainer.generation.shared_prompt_prefix([[1, 2, 3], [1, 2, 4]]) == 2
