"""Record TRL's own DPO and KTO loss values, the reference tests/trainer/test_preference.py holds ours to.

    pip download trl==0.19.1 --no-deps -d /tmp/trl && (cd /tmp/trl && unzip -qo trl-*.whl)
    .venv/bin/python scripts/trl_reference_values.py /tmp/trl > tests/trainer/data/preference_reference.json

TRL's trainers need accelerate, datasets and a training loop of their own, so
the loss methods (`DPOTrainer.dpo_loss`, `KTOTrainer.kto_loss`) are lifted
out of TRL's source as they are and called with the settings they read; the
inputs are sequence log-probabilities of a tiny model (trainer/model.py's
`build_tiny_model`) before and after a step of LoRA noise, so they have a
real model's shape and scale.
"""

from __future__ import annotations

import ast
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace


def lifted(source: Path, cls: str, method: str, namespace: dict):
    """`cls.method` from TRL's source file, defined in `namespace` (its module's names that the method uses)."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    node = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == method)
    exec(compile(ast.Module([node], []), str(source), "exec"), namespace)
    return namespace[method]


def tiny_logps() -> dict[str, list[float]]:
    """Sequence log-probabilities of a tiny model's answers: the reference (LoRA at zero) and a perturbed policy."""
    import torch

    from schemas.training import TrainingExample
    from trainer.data import tokenize
    from trainer.generation import pad_id
    from trainer.lora import add_lora
    from trainer.model import BaseModelRef, build_tiny_model, load_base
    from trainer.preference import sequence_logps

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, device = load_base(BaseModelRef(str(build_tiny_model(Path(tmp) / "model")), "tiny", ""), "float32")
        torch.manual_seed(0)
        peft_model = add_lora(model, 8, 16, 0.0, ("q_proj", "v_proj"), 1.0)
        peft_model.eval()
        texts = [("What is my dog called?", "Rex."), ("Which city?", "Oslo, the capital of Norway."), ("Hi?", "Hello there!")]
        texts += [("What is my dog called?", "I do not know."), ("Which city?", "Paris."), ("Hi?", "Good day to you.")]
        seqs = tokenize(tokenizer, [TrainingExample(prompt=p, response=r) for p, r in texts], 64)
        with torch.no_grad():
            reference = sequence_logps(peft_model, seqs, pad_id(tokenizer), device).tolist()
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.05)
            policy = sequence_logps(peft_model, seqs, pad_id(tokenizer), device).tolist()
        peft_model.unload()
    return {"policy": policy, "reference": reference}


def main(trl_root: str) -> None:
    import torch
    import torch.nn.functional as F

    root = Path(trl_root) / "trl" / "trainer"
    config = {"torch": torch}
    lifted_enum = ast.parse((root / "dpo_config.py").read_text(encoding="utf-8"))
    enum = next(n for n in lifted_enum.body if isinstance(n, ast.ClassDef) and n.name == "FDivergenceType")
    exec(compile(ast.Module([ast.parse("from enum import Enum").body[0], enum], []), "dpo_config.py", "exec"), config)
    namespace = {"torch": torch, "F": F, "FDivergenceType": config["FDivergenceType"]}
    dpo_loss = lifted(root / "dpo_trainer.py", "DPOTrainer", "dpo_loss", dict(namespace))
    kto_loss = lifted(root / "kto_trainer.py", "KTOTrainer", "kto_loss", dict(namespace))
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t)
    logps = tiny_logps()
    policy, reference = torch.tensor(logps["policy"]), torch.tensor(logps["reference"])
    cases = []
    for beta in (0.1, 0.5):
        dpo_self = SimpleNamespace(
            accelerator=accelerator,
            reference_free=False,
            f_divergence_type="reverse_kl",
            loss_type="sigmoid",
            beta=beta,
            label_smoothing=0.0,
            use_weighting=False,
        )
        dpo, _, _ = dpo_loss(dpo_self, policy[:3], policy[3:], reference[:3], reference[3:])
        kto_self = SimpleNamespace(
            accelerator=accelerator, calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=1.0, undesirable_weight=1.0
        )
        # liked: the first three answers; disliked: the last three; KL from the answers after other prompts (rolled).
        kto, _, _, kl = kto_loss(
            kto_self, policy[:3], policy[3:], policy.roll(1), reference[:3], reference[3:], reference.roll(1)
        )
        cases.append({"beta": beta, "dpo": dpo.tolist(), "kto": kto.tolist(), "kto_kl": float(kl)})
    print(json.dumps({"trl": "0.19.1", **logps, "cases": cases}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
