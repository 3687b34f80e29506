"""Feed-forward blocks: gated (SwiGLU, GeGLU) and plain (up, activation, down), tensor-parallel.

The up (and gate) projection is column-parallel and the down projection row-parallel, so each rank
computes its share of the intermediate features and one all-reduce sums the outputs. Activations round
exactly as transformers' (`tokenmill.layers.activations`), so `gelu_new` or `gelu_pytorch_tanh` match the
reference.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.interfaces import LayerOps, ShardStyle
from tokenmill.layers.activations import activation as activation_module
from tokenmill.layers.linear import Linear, row_parallel_linear
from tokenmill.parallel import SINGLE_RANK, ParallelContext


class GatedMLP(nn.Module):
    """`down(act(gate(x)) * up(x))`, gate and up fused in one column-parallel `gate_up_proj`.

    SiLU goes through the backend's fused `silu_and_mul`; other activations (Gemma's tanh GELU) run as
    plain PyTorch.
    """

    ops = LayerOps()  # the backend's, set by the engine

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool, dtype: torch.dtype,
                 parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        self.activation = activation
        self.act = activation_module(activation)
        self.gate_up_proj = Linear(hidden_size, [intermediate_size, intermediate_size], bias, dtype,
                                   ShardStyle.COLUMN, parallel)
        self.down_proj = row_parallel_linear(intermediate_size, hidden_size, bias, dtype, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.activation == "silu":
            return self.down_proj(self.ops.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class MLP(nn.Module):
    """`fc2(act(fc1(x)))` with biases (Phi-2's fc1/fc2, StarCoder2's c_fc/c_proj)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool, dtype: torch.dtype,
                 parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        self.act = activation_module(activation)
        self.fc1 = Linear(hidden_size, [intermediate_size], bias, dtype, ShardStyle.COLUMN, parallel)
        self.fc2 = row_parallel_linear(intermediate_size, hidden_size, bias, dtype, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
