"""The frozen base model's matrix products in bfloat16 during training steps, on CPUs that multiply it natively.

    matmuls = FrozenMatmuls.for_model(model, device, cfg.base_matmuls)   # None: float32 as loaded
    with low_precision(matmuls):
        loss = ...; loss.backward()

A training step's time is mostly the base model's linear layers and its
output projection, frozen, in float32. A CPU with AMX (Intel Sapphire Rapids
and later) multiplies bfloat16 3-5x faster than float32 (measured on this
project's 2-core VM: 384 x 576 by 576 x 1536 in 1.0 ms against 4.0 ms;
benchmarks/README.md), so inside `low_precision` each frozen `nn.Linear`
multiplies a bfloat16 copy of its weight by its input rounded to bfloat16
and hands back float32. Everything that learns or accumulates stays float32:
the LoRA weights and their products, the optimizer, the residual stream,
norms, attention, the losses. This is mixed precision as GPUs train, for
the frozen part only. The model's own weights are never changed: the copies
live while the `FrozenMatmuls` does, and outside the context every module is
as it was, so generation, the gate and serving see the float32 model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial

from core.errors import ConfigError

_DTYPES = ("float32", "bfloat16")


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles), so bfloat16 products are faster, not slower."""
    import torch

    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(is_amx and is_amx() and torch.backends.mkldnn.is_available())


def resolved(setting: str, device, weight_dtype) -> str:
    """`training.base_matmuls` for this model: auto is bfloat16 for a float32 model on an AMX CPU, else float32."""
    import torch

    if setting not in ("auto", *_DTYPES):
        raise ConfigError(f"training.base_matmuls: {setting!r} is not one of auto, float32, bfloat16")
    if setting != "auto":
        return setting
    on_cpu = getattr(device, "type", str(device)) == "cpu"
    return "bfloat16" if on_cpu and weight_dtype == torch.float32 and native_bf16_cpu() else "float32"


def effective(setting: str, device, weight_dtype) -> str:
    """The precision the frozen products of a training step run in: the model's own unless it is float32."""
    import torch

    return resolved(setting, device, weight_dtype) if weight_dtype == torch.float32 else str(weight_dtype).removeprefix("torch.")


# Sibling layers that read the same input in the decoder layouts this project loads (Llama, Qwen2, Mistral).
_SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FrozenMatmuls:
    """Low-precision copies of a model's frozen linear layers' weights, and the context that multiplies with them.

    Siblings that read the same input (a layer's q, k and v projections; its
    gate and up projections) multiply as one product with their weights side
    by side: the input is rounded once instead of once per sibling, and the
    backward pass takes one product back instead of one per sibling (a
    sibling asked with another input gets its own product: never wrong,
    only not shared).
    """

    @classmethod
    def for_model(cls, model, device, setting: str) -> FrozenMatmuls | None:
        """For `model` under the setting, or None when its products stay as loaded (float32, or a bfloat16 model)."""
        import torch

        weight_dtype = next(model.parameters()).dtype
        if weight_dtype != torch.float32 or effective(setting, device, weight_dtype) != "bfloat16":
            return None
        return cls(model, torch.bfloat16)

    def __init__(self, model, dtype) -> None:
        import torch

        frozen = {
            name.removesuffix(".base_layer"): module  # PEFT wraps an adapted layer: its own layer is `base_layer`
            for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and not module.weight.requires_grad and module.weight.dtype == torch.float32
        }
        self.siblings = _sibling_groups(frozen, dtype)
        grouped = {module: group.weights[i] for group in self.siblings for i, module in enumerate(group.modules)}
        self.copies = {m: grouped[m] if m in grouped else m.weight.detach().to(dtype) for m in frozen.values()}

    @contextmanager
    def active(self) -> Iterator[None]:
        """Each frozen linear layer multiplies in the low precision (its float32 input and output kept)."""
        swapped = []
        try:
            for module, forward in self._forwards().items():
                module.forward = forward
                swapped.append(module)
            yield
        finally:
            for module in swapped:
                del module.forward
            for group in self.siblings:
                group.forget()

    def _forwards(self) -> dict:
        """The low-precision forward of each module: its group's share, or its own product; none for a module with
        another library's own forward (a hook framework), which is left alone, and its siblings multiply alone."""
        own = {module for module in self.copies if "forward" in module.__dict__}
        forwards = {module: partial(_low_forward, module, weight) for module, weight in self.copies.items() if module not in own}
        for group in self.siblings:
            if not own.intersection(group.modules):
                forwards.update({module: partial(_sibling_forward, group, i) for i, module in enumerate(group.modules)})
        return forwards


class _Siblings:
    """Frozen linear layers that read the same input: one low-precision product for all of them."""

    def __init__(self, modules: list, dtype) -> None:
        import torch

        self.modules = modules
        self.widths = [m.out_features for m in modules]
        self.weight = torch.cat([m.weight.detach().to(dtype) for m in modules])
        self.weights = self.weight.split(self.widths)  # each layer's own rows (views: no second copy)
        self.bias = None
        if any(m.bias is not None for m in modules):  # a layer without one adds zeros in its columns
            biases = [m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules]
            self.bias = torch.cat(biases).to(dtype)
        self._input = None
        self._outputs: tuple = ()

    def output(self, index: int, x):
        """Layer `index`'s output for `x`: the siblings' product is made at the first of them to ask for it."""
        import torch.nn.functional as F

        if self._input is not x:
            full = F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)
            self._input, self._outputs = x, full.split(self.widths, dim=-1)
        out = self._outputs[index]
        if index == len(self.modules) - 1:
            self.forget()  # the last sibling has it: hold no activations past the layer
        return out

    def forget(self) -> None:
        self._input, self._outputs = None, ()


def _sibling_groups(frozen: dict, dtype) -> list[_Siblings]:
    """The `_SHARED_INPUT` groups found among the frozen layers (by name: `<parent>.q_proj`, ...), all of one input width."""
    groups = []
    for parent in {name.rpartition(".")[0] for name in frozen}:
        for names in _SHARED_INPUT:
            modules = [frozen.get(f"{parent}.{leaf}" if parent else leaf) for leaf in names]
            if all(m is not None for m in modules) and len({m.in_features for m in modules}) == 1:
                groups.append(_Siblings(modules, dtype))
    return groups


def low_precision(matmuls: FrozenMatmuls | None) -> AbstractContextManager:
    """`matmuls.active()`, or a context that does nothing without them."""
    return nullcontext() if matmuls is None else matmuls.active()


def multiplying_weight(module):
    """The weight a frozen linear layer multiplies by now: its copy inside `FrozenMatmuls.active()`, else its own."""
    forward = module.__dict__.get("forward")
    if isinstance(forward, partial) and forward.func is _low_forward:
        return forward.args[1]
    if isinstance(forward, partial) and forward.func is _sibling_forward:
        group, index = forward.args
        return group.weights[index]
    return module.weight


def _low_forward(module, weight, x):
    import torch.nn.functional as F

    bias = None if module.bias is None else module.bias.to(weight.dtype)
    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def _sibling_forward(group: _Siblings, index: int, x):
    return group.output(index, x)
