"""Mixtral: the Mistral block with a sparse mixture of experts in place of every MLP: each token goes to the
`num_experts_per_tok` of `num_local_experts` experts its router scores highest, their weights renormalized
to sum to one."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.layers.moe import SparseMoeBlock, load_expert_weights
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.parallel import ParallelContext


class MixtralForCausalLM(LlamaForCausalLM):
    def make_mlp(self, config: Any, layer_index: int, dtype: torch.dtype, parallel: ParallelContext) -> nn.Module:
        return SparseMoeBlock(config.hidden_size, config.num_local_experts, config.intermediate_size,
                              config.num_experts_per_tok, True, dtype, parallel)

    def load_weights(self, tensors: dict[str, torch.Tensor], loaded_elsewhere: set[str] = frozenset()) -> None:
        """Expert weights per expert (block_sparse_moe.experts.N.w1/w3/w2) or stacked, then the rest as Llama's."""
        rest, experts = load_expert_weights(self, tensors)
        super().load_weights(rest, experts | loaded_elsewhere)
