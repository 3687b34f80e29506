"""LoRA on the CPU: a C kernel for decode steps, one masked pair of GEMMs for larger ones.

The reference (`tokenmill.interfaces.LoRAMethod`) gathers each adapter's tokens, runs two small matmuls
and scatters the result back: four PyTorch calls per adapter in the step, which at decode sizes cost
more than the arithmetic. `MaskedLoRA` instead

* for steps of up to `MAX_KERNEL_TOKENS` adapter tokens, calls csrc/lora.c once: each token's own
  ``B (A x)`` in float32, written into the layer's output;
* for larger steps, stacks the A and B of the adapters the step uses (kept until that set changes) and
  computes every token against all of them at once, three calls whatever the number of adapters::

      h = x @ A_active.T                 (tokens, adapters * rank)
      h *= mask                          each token keeps its own adapter's columns, 0 for the base model
      y += h @ B_active.T

  That work grows with tokens x adapters x rank, so past `MAX_MASKED_COLUMNS` columns, or for long
  steps mixing several adapters, the reference's exact work wins and is used.

Measured on SmolLM2's 576 -> 1536 projection at rank 8, one thread (`python -m benchmarks.micro.lora`):
see plugins/cpu/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmill.interfaces import LoRABatch, LoRAMethod

try:
    from tokenmill.plugins.cpu import _lora
except ImportError:  # pragma: no cover - depends on the build
    _lora = None

MAX_KERNEL_TOKENS = 128  # adapter tokens a step may have for the C kernel; beyond, the GEMMs catch up
MAX_MASKED_COLUMNS = 128  # adapters x rank: beyond it, the wasted columns cost more than the reference's calls
MAX_MASKED_MIXED_TOKENS = 256  # with several adapters, longer steps waste more than the reference's gathers cost


@dataclass
class StackedWeights:
    """One layer's adapters by slot, B transposed for the kernel, and the stack of the last slots a step used."""

    a: torch.Tensor  # (num_slots, rank, in), slot 0 zeros
    b: torch.Tensor  # (num_slots, out, rank)
    b_t: torch.Tensor  # (num_slots, rank, out): a token's 16 outputs read 16 contiguous values per rank
    cached: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def stacked(self, slots: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(slots) * rank, in) and (out, len(slots) * rank): the slots' A and B side by side."""
        if slots not in self.cached:
            index = torch.tensor(slots, device=self.a.device)
            a = self.a.index_select(0, index).flatten(0, 1)
            b = self.b.index_select(0, index).permute(1, 0, 2).flatten(1, 2).contiguous()
            self.cached = {slots: (a, b)}  # one set at a time: a decode batch keeps its adapters for many steps
        return self.cached[slots]


class MaskedLoRA(LoRAMethod):
    """The CPU backend's `LoRAMethod`: the C kernel for decode steps, masked GEMMs over the step's adapters
    for larger ones, the reference where neither pays."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.kernel = _lora is not None and dtype in (torch.bfloat16, torch.float32)

    def prepare(self, a: torch.Tensor, b: torch.Tensor) -> StackedWeights:
        return StackedWeights(a.contiguous(), b.contiguous(), b.transpose(1, 2).contiguous())

    def prepare_step(self, batch: LoRABatch) -> None:
        rows = batch.token_indices
        if self.kernel and rows.numel() <= MAX_KERNEL_TOKENS and rows.device.type == "cpu":
            batch.method_data["kernel"] = (rows.contiguous(), batch.token_slots.index_select(0, rows).contiguous())
            return
        slots = batch.slots
        index = torch.tensor(slots, device=batch.token_slots.device)
        batch.method_data["masked"] = (slots, (batch.token_slots[:, None] == index).to(self.dtype))

    def apply(self, y: torch.Tensor, x: torch.Tensor, prepared: StackedWeights, batch: LoRABatch) -> torch.Tensor:
        kernel = "kernel" in batch.method_data and x.dtype == y.dtype == self.dtype
        # The C side trusts its pointers: the shapes are checked here (a mismatch goes on to raise in torch).
        if (kernel and x.stride(-1) == 1 and y.is_contiguous() and x.shape[1] == prepared.a.shape[2]
                and y.shape == (x.shape[0], prepared.b_t.shape[2])):
            rows, slots = batch.method_data["kernel"]
            _lora.apply(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), prepared.a.data_ptr(),
                        prepared.b_t.data_ptr(), rows.data_ptr(), slots.data_ptr(), rows.shape[0], x.shape[1],
                        y.shape[1], prepared.a.shape[1], int(self.dtype == torch.bfloat16), torch.get_num_threads())
            return y
        rank = prepared.a.shape[1]
        slots = batch.slots
        if ("masked" not in batch.method_data or len(slots) * rank > MAX_MASKED_COLUMNS
                or (len(slots) > 1 and x.shape[0] > MAX_MASKED_MIXED_TOKENS)):
            return super().apply(y, x, (prepared.a, prepared.b), batch)
        _, mask = batch.method_data["masked"]
        a, b = prepared.stacked(slots)
        h = (x @ a.T).view(x.shape[0], len(slots), rank).mul_(mask[:, :, None])
        return y.addmm_(h.view(x.shape[0], -1), b.T)
