"""LoRA adapters on a built model: every adapted linear layer gets its adapters stacked by slot.

Slot 0 is the base model, slots 1..N the adapters in the order they were given. Each adapted `Linear`
holds a `LoRALayer`; every step, the model runner hands the step's `LoRABatch` (which slot each token
uses) to `LoRAAdapters.begin_step`, and each adapted layer adds its adapters' contribution to its output
with the backend's `LoRAMethod`, once for the whole batch. Requests for different adapters and for the
base model thus share one batch.

A layer fused from several checkpoint modules (q/k/v, gate/up) takes one block of rank per fused part:
its A is the parts' A stacked along the rank, its B block-diagonal, so `B (A x)` adapts each part with
its own pair. Adapters of lower rank, or adapting fewer parts, are padded with zeros.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Sequence

import torch
from torch import nn

from tokenmill.errors import ValidationError
from tokenmill.interfaces import LoRABatch, LoRAMethod
from tokenmill.layers.linear import Linear
from tokenmill.lora import resolve_adapter_path
from tokenmill.lora.peft import PeftAdapter, read_peft_adapter

logger = logging.getLogger(__name__)

ADAPTABLE = "the decoder layers' attention and MLP projections (q/k/v, o, gate/up, down)"
# One adapter's pair on one layer: (slot, fused part or None for all, A, B's rows per part), this rank's.
_Part = tuple[int, "int | None", torch.Tensor, list[tuple[int, torch.Tensor]]]


class LoRAAdapters:
    """The adapters a model was built with, by slot, and the running step's `LoRABatch`."""

    def __init__(self, names: Sequence[str], method: LoRAMethod):
        self.names = tuple(names)
        self.method = method
        self.batch: LoRABatch | None = None  # the running step's; None: no token uses an adapter

    def slot(self, name: str | None) -> int:
        """The slot of adapter `name` (None: the base model, slot 0); a `ValidationError` if none is loaded so."""
        if name is None:
            return 0
        try:
            return self.names.index(name) + 1
        except ValueError:
            loaded = ", ".join(self.names) or "none"
            raise ValidationError(f"LoRA adapter {name!r} is not loaded; loaded adapters: {loaded}") from None

    def begin_step(self, batch: LoRABatch | None) -> None:
        """Make `batch` the one every adapted layer reads until the next step."""
        self.batch = batch
        if batch is not None:
            self.method.prepare_step(batch)


class LoRALayer:
    """One linear layer's adapters in the method's prepared form; adds them to the layer's output."""

    def __init__(self, adapters: LoRAAdapters, prepared: Any):
        self.adapters = adapters
        self.prepared = prepared

    def __call__(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        batch = self.adapters.batch
        if batch is None:
            return y
        return self.adapters.method.apply(y, x, self.prepared, batch)


def attach_adapters(model: nn.Module, adapters: Sequence[PeftAdapter], method: LoRAMethod, dtype: torch.dtype,
                    device: torch.device) -> LoRAAdapters:
    """Give every linear layer of `model` that some adapter adapts its `LoRALayer`; return the adapters' handle."""
    names = [adapter.name for adapter in adapters]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValidationError(f"LoRA adapter names must be unique; given twice: {', '.join(duplicates)}")
    handle = LoRAAdapters(names, method)
    targets: dict[Linear, list[_Part]] = defaultdict(list)
    for slot, adapter in enumerate(adapters, start=1):
        for module_name, (a, b) in adapter.modules.items():
            linear, shard = _target(model, adapter, module_name)
            try:
                targets[linear].append((slot, shard, *linear.lora_part(a, b, shard)))
            except ValueError as exc:
                raise ValidationError(f"LoRA adapter {adapter.name!r} ({adapter.path}): {module_name}: {exc}; "
                                      "was it trained on this model?") from None
    for linear, entries in targets.items():
        a, b = _stack(linear, entries, len(adapters) + 1)
        linear.lora = LoRALayer(handle, method.prepare(a.to(device=device, dtype=dtype),
                                                       b.to(device=device, dtype=dtype)))
    logger.info("LoRA: %d adapter(s) over %d linear layers: %s", len(adapters), len(targets), ", ".join(names))
    return handle


def _target(model: nn.Module, adapter: PeftAdapter, module_name: str) -> tuple[Linear, int | None]:
    """The linear layer a checkpoint module name lands in, and which of its fused parts (None: all)."""
    local = module_name.removeprefix("model.")
    parent, _, leaf = local.rpartition(".")
    fused, shard = model.packed.get(leaf, (leaf, None))
    try:
        module = model.get_submodule(f"{parent}.{fused}") if parent.startswith("layers.") else None
    except AttributeError:
        module = None
    if not isinstance(module, Linear):
        raise ValidationError(f"LoRA adapter {adapter.name!r} ({adapter.path}) adapts {module_name!r}, which "
                              f"{type(model).__name__} cannot adapt; LoRA applies to {ADAPTABLE}")
    return module, shard


def _stack(linear: Linear, parts: list[_Part], num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_slots, rank, in) and (num_slots, out, rank) float32 stacks for one layer: one block of rank
    per fused part any adapter adapts, as wide as the widest adapter's rank there."""
    keys = sorted({shard for _, shard, _, _ in parts}, key=lambda shard: -1 if shard is None else shard)
    widths = [max(a.shape[0] for _, shard, a, _ in parts if shard == key) for key in keys]
    offsets = dict(zip(keys, (sum(widths[:i]) for i in range(len(keys)))))
    a_stack = torch.zeros(num_slots, sum(widths), parts[0][2].shape[1])
    b_stack = torch.zeros(num_slots, linear.shard_offsets[-1], sum(widths))
    for slot, shard, a, pieces in parts:
        columns = slice(offsets[shard], offsets[shard] + a.shape[0])
        a_stack[slot, columns] = a
        for part, rows in pieces:
            b_stack[slot, linear.shard_offsets[part] : linear.shard_offsets[part + 1], columns] = rows
    return a_stack, b_stack


def load_adapters(model: nn.Module, specs: Sequence[tuple[str, str]], method: LoRAMethod, dtype: torch.dtype,
                  device: torch.device) -> LoRAAdapters:
    """Read each (name, folder or hub id) adapter and attach them all to `model`'s linear layers."""
    adapters = [read_peft_adapter(name, resolve_adapter_path(name, source)) for name, source in specs]
    return attach_adapters(model, adapters, method, dtype, device)
