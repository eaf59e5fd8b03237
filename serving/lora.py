"""Each row of a batch through its own user's LoRA adapter, on one plain base model.

    weights = read_adapter(path, name="alice@v3")        # a PEFT adapter directory, read into memory
    rows = RowLora(model)                                 # hooks on the base model's linear layers, once
    with rows.use([weights, None, weights2]):             # row 0: alice@v3, row 1: the base model, row 2: ...
        logits = model(input_ids, ...).logits

The base model is never changed: a forward hook on each linear layer adds,
for the rows of each adapter that targets that layer, exactly what PEFT adds
(`result + lora_B(lora_A(x)) * scaling`, with the same operations), so a row
gets the answer `adaptloop ask` gives with that adapter. Loading an adapter is
reading its file into tensors of its own; nothing the running batch uses is
touched, so a load never has to wait for a generation step, nor a step for a
load. Rows are grouped by adapter, so a batch of one user's rows costs two
small matrix products per layer, and a batch of 16 users' rows 16 of them.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import ModelError
from schemas.manifest import ADAPTER_CONFIG, ADAPTER_WEIGHTS

_PREFIX = "base_model.model."
_SUFFIX_A, _SUFFIX_B = ".lora_A.weight", ".lora_B.weight"


@dataclass(eq=False)
class LoraWeights:
    """One adapter version in memory: per target module its A (r x in) and B (out x r), and the scaling."""

    name: str
    modules: dict[str, tuple[object, object]]
    scaling: float
    sha256: str = ""
    nbytes: int = field(default=0)


def read_adapter(path: Path, name: str, sha256: str = "", device: str = "cpu") -> LoraWeights:
    """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) read into memory."""
    from safetensors.torch import load_file

    config = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("lora_bias"):
        raise ModelError(f"{path}: only plain LoRA adapters can be served")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / (r**0.5) if config.get("use_rslora") else alpha / r
    tensors = load_file(Path(path) / ADAPTER_WEIGHTS, device=device)
    modules = {}
    for key, a in tensors.items():
        if key.endswith(_SUFFIX_A):
            module = key.removeprefix(_PREFIX).removesuffix(_SUFFIX_A)
            b = tensors.get(key.removesuffix(_SUFFIX_A) + _SUFFIX_B)
            if b is None:
                raise ModelError(f"{path}: {module} has lora_A but no lora_B")
            modules[module] = (a, b)
    if not modules:
        raise ModelError(f"{path}: no LoRA weights in {ADAPTER_WEIGHTS}")
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return LoraWeights(name, modules, scaling, sha256, nbytes)


@dataclass
class _Group:
    rows: object | None  # a LongTensor of row indices, or None for every row of the batch
    a: object
    b: object
    scaling: float


class RowLora:
    """Forward hooks on every linear layer of the base model's decoder that add each row's adapter."""

    def __init__(self, model, plans_kept: int = 64) -> None:
        self._plan: dict[str, list[_Group]] | None = None
        self._plans: OrderedDict[tuple, dict[str, list[_Group]]] = OrderedDict()  # by the rows' adapters
        self._plans_kept = plans_kept
        self._plans_lock = threading.Lock()  # the generation thread uses plans; a request thread may evict an adapter
        self.handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in model.named_modules()
            if type(module).__name__ == "Linear" and ".layers." in f".{name}"
        ]
        if not self.handles:
            raise ModelError("the base model has no decoder linear layers to put LoRA on")

    def _hook(self, name: str):
        import torch.nn.functional as F

        def add_rows_adapters(_module, inputs, output):
            plan = self._plan
            groups = plan.get(name) if plan is not None else None
            if not groups:
                return None
            x = inputs[0]
            for group in groups:
                if group.rows is None:  # every row: exactly PEFT's `result + lora_B(lora_A(x)) * scaling`
                    output = output + F.linear(F.linear(x, group.a), group.b) * group.scaling
                else:
                    delta = F.linear(F.linear(x.index_select(0, group.rows), group.a), group.b) * group.scaling
                    output = output.index_add(0, group.rows, delta)
            return output

        return add_rows_adapters

    @contextmanager
    def use(self, adapters: list[LoraWeights | None]) -> Iterator[None]:
        """Within it, row i of every forward pass goes through `adapters[i]` (None: the base model alone)."""
        key = tuple((a.name, a.sha256) if a is not None else None for a in adapters)
        if all(a is None for a in adapters):
            self._plan = None
        else:
            with self._plans_lock:
                self._plan = self._plans.get(key) or self._make_plan(key, adapters)
                self._plans.move_to_end(key)
        try:
            yield
        finally:
            self._plan = None

    def _make_plan(self, key: tuple, adapters: list[LoraWeights | None]) -> dict[str, list[_Group]]:
        import torch

        rows_of: dict[str, list[int]] = {}
        by_name: dict[str, LoraWeights] = {}
        for row, adapter in enumerate(adapters):
            if adapter is not None:
                rows_of.setdefault(adapter.name, []).append(row)
                by_name[adapter.name] = adapter
        plan: dict[str, list[_Group]] = {}
        for name, rows in rows_of.items():
            adapter = by_name[name]
            index = None if len(rows) == len(adapters) else torch.tensor(rows, dtype=torch.long)
            for module, (a, b) in adapter.modules.items():
                plan.setdefault(module, []).append(_Group(index, a, b, adapter.scaling))
        self._plans[key] = plan
        while len(self._plans) > self._plans_kept:
            self._plans.popitem(last=False)
        return plan

    def forget(self, adapter: LoraWeights) -> None:
        """Drop the cached plans that hold `adapter` (it was evicted: its tensors go with it)."""
        with self._plans_lock:
            for key in [k for k in self._plans if (adapter.name, adapter.sha256) in k]:
                del self._plans[key]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
