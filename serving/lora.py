"""Each row of a batch through its own user's LoRA adapter, on one plain base model.

    weights = read_adapter(path, name="alice@v3")        # a PEFT adapter directory, read into memory
    rows = RowLora(model)                                 # hooks on the base model's linear layers, once
    with rows.use([weights, None, weights2]):             # row 0: alice@v3, row 1: the base model, row 2: ...
        logits = model(input_ids, ...).logits

The base model is never changed: a forward hook on each linear layer adds
each row's LoRA update. When every row has the same adapter, the hook does
exactly what PEFT does (`result + lora_B(lora_A(x)) * scaling`, the same
operations), so an answer is the one `adaptloop ask` gives with that adapter.
When rows differ, the batch's adapters are stacked side by side and each
layer costs two matrix products whatever their number (see RowLora). Loading
an adapter is reading its file into tensors of its own (on the model's
device, in its dtype); nothing the running batch uses is touched, so a load
never waits for a generation step, nor a step for a load.
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


def read_adapter(
    path: Path, name: str, sha256: str = "", device: str = "cpu", dtype=None, files: dict[str, bytes] | None = None
) -> LoraWeights:
    """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) read into memory.

    `files`: the two files' content when the caller has read them already
    (a registry version sealed at rest, opened by `AdapterRegistry.files`)."""
    from safetensors.torch import load

    if files is None:
        files = {file: (Path(path) / file).read_bytes() for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
    config = json.loads(files[ADAPTER_CONFIG].decode("utf-8"))
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("lora_bias"):
        raise ModelError(f"{path}: only plain LoRA adapters can be served")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / (r**0.5) if config.get("use_rslora") else alpha / r
    tensors = {key: t.to(device) for key, t in load(files[ADAPTER_WEIGHTS]).items()}
    if dtype is not None:
        tensors = {key: t.to(dtype) for key, t in tensors.items()}
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


@dataclass(frozen=True)
class _Stacked:
    """One layer's LoRA for a set of adapters, side by side: A's stacked (R x in), B's (out x R, scaling folded in)."""

    a: object
    b: object
    blocks: tuple  # per adapter of the set: its (start, stop) in R, or None when it does not target this layer


@dataclass(frozen=True)
class _SetPlan:
    """A set of adapters laid out for one forward pass each: every layer's stacked weights."""

    keys: tuple  # (name, sha256) of each adapter, in block order
    layers: dict[str, _Stacked]


class RowLora:
    """Forward hooks on every linear layer of the base model's decoder that add each row's adapter.

    One adapter for every row: PEFT's own operations (`lora_B(lora_A(x)) *
    scaling`). Rows of different adapters (or none): the adapters of the batch
    stacked side by side, so each layer costs two matrix products whatever the
    number of adapters: `x @ A_all` gives every adapter's projection, a mask keeps
    each row's own block (zero for a base-model row), and `@ B_all` maps it back.
    A stacked set is kept while its adapters stay in the batch (a batch that
    lost rows reuses it), and rebuilt when an adapter joins.
    """

    def __init__(self, model, sets_kept: int = 2) -> None:
        self._single: LoraWeights | None = None
        self._stacked: _SetPlan | None = None
        self._masks: dict[tuple, object] = {}
        self._sets: OrderedDict[tuple, _SetPlan] = OrderedDict()
        self._sets_kept = sets_kept
        self._sets_lock = threading.Lock()  # the generation thread builds sets; a request thread may evict an adapter
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
            single = self._single
            if single is not None:  # every row the same adapter: exactly PEFT's `result + lora_B(lora_A(x)) * scaling`
                weights = single.modules.get(name)
                if weights is None:
                    return None
                return output + F.linear(F.linear(inputs[0], weights[0]), weights[1]) * single.scaling
            stacked = self._stacked.layers.get(name) if self._stacked is not None else None
            if stacked is None:
                return None
            mask = self._masks[stacked.blocks]
            return output + F.linear(F.linear(inputs[0], stacked.a) * mask, stacked.b)

        return add_rows_adapters

    @contextmanager
    def use(self, adapters: list[LoraWeights | None]) -> Iterator[None]:
        """Within it, row i of every forward pass goes through `adapters[i]` (None: the base model alone)."""
        present = {(a.name, a.sha256): a for a in adapters if a is not None}
        if len(present) == 1 and all(a is not None for a in adapters):
            self._single = next(iter(present.values()))
        elif present:
            plan = self._set_for(present)
            self._masks = self._row_masks(plan, [None if a is None else (a.name, a.sha256) for a in adapters])
            self._stacked = plan
        try:
            yield
        finally:
            self._single, self._stacked, self._masks = None, None, {}

    # ---- stacked sets ------------------------------------------------------------------ #

    def _set_for(self, present: dict[tuple, LoraWeights]) -> _SetPlan:
        """A kept set holding every adapter present and not more than twice as many; else a new one."""
        wanted = set(present)
        with self._sets_lock:
            for key, plan in self._sets.items():
                if wanted <= set(key) and len(key) <= 2 * len(wanted):
                    self._sets.move_to_end(key)
                    return plan
            plan = _stack(list(present.values()))
            self._sets[plan.keys] = plan
            while len(self._sets) > self._sets_kept:
                self._sets.popitem(last=False)
            return plan

    @staticmethod
    def _row_masks(plan: _SetPlan, rows: list[tuple | None]) -> dict[tuple, object]:
        """Per block layout: a (rows x 1 x R) mask of ones over each row's own adapter block."""
        import torch

        position = {key: i for i, key in enumerate(plan.keys)}
        masks: dict[tuple, object] = {}
        for layer in plan.layers.values():
            if layer.blocks in masks:
                continue
            width = layer.a.shape[0]
            mask = torch.zeros((len(rows), 1, width), dtype=layer.a.dtype, device=layer.a.device)
            for row, key in enumerate(rows):
                block = layer.blocks[position[key]] if key is not None else None
                if block is not None:
                    mask[row, 0, block[0] : block[1]] = 1
            masks[layer.blocks] = mask
        return masks

    def forget(self, adapter: LoraWeights) -> None:
        """Drop the kept sets that hold `adapter` (it was evicted: its tensors go with it)."""
        with self._sets_lock:
            for key in [k for k in self._sets if (adapter.name, adapter.sha256) in k]:
                del self._sets[key]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _stack(adapters: list[LoraWeights]) -> _SetPlan:
    """Every layer's A's stacked (R x in) and B's side by side (out x R), each B scaled by its adapter's scaling."""
    import torch

    layers: dict[str, _Stacked] = {}
    for module in sorted({m for a in adapters for m in a.modules}):
        a_parts, b_parts, blocks, start = [], [], [], 0
        for adapter in adapters:
            weights = adapter.modules.get(module)
            if weights is None:
                blocks.append(None)
                continue
            a, b = weights
            a_parts.append(a)
            b_parts.append(b * adapter.scaling)
            blocks.append((start, start + a.shape[0]))
            start += a.shape[0]
        layers[module] = _Stacked(torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1), tuple(blocks))
    return _SetPlan(tuple((a.name, a.sha256) for a in adapters), layers)
