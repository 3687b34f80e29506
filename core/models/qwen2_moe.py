"""Qwen2-MoE: the Qwen2 block (q/k/v biases) whose MLP is, in its sparse layers, a mixture of experts plus a
shared expert every token passes through, scaled by a sigmoid gate.

Routing weights are the softmax's top-k values as they are (`norm_topk_prob`, false in Qwen1.5-MoE and
Qwen2-57B-A14B). Layer i is sparse unless it is in `mlp_only_layers` or i + 1 is not a multiple of
`decoder_sparse_step`; the others keep a dense MLP of `intermediate_size`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.layers.moe import SparseMoeBlock, check_expert_sharding, load_expert_weights
from tokenmill.models.llama import LlamaForCausalLM, LlamaMLP
from tokenmill.parallel import ParallelContext


def is_sparse_layer(config: Any, layer_index: int) -> bool:
    """Whether Qwen-MoE layer `layer_index` has experts (transformers' rule)."""
    return (layer_index not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0
            and (layer_index + 1) % config.decoder_sparse_step == 0)


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    has_shared_expert = True

    @property
    def qkv_bias(self) -> bool:
        return bool(getattr(self.config, "qkv_bias", True))

    def make_mlp(self, config: Any, layer_index: int, dtype: torch.dtype, parallel: ParallelContext) -> nn.Module:
        if not is_sparse_layer(config, layer_index):
            return LlamaMLP(config, dtype, parallel)
        shared = None
        if self.has_shared_expert:
            check_expert_sharding({"shared_expert_intermediate_size": config.shared_expert_intermediate_size},
                                  parallel)
            shared = LlamaMLP(config, dtype, parallel, config.shared_expert_intermediate_size)
        check_expert_sharding({"moe_intermediate_size": config.moe_intermediate_size}, parallel)
        return SparseMoeBlock(config.hidden_size, config.num_experts, config.moe_intermediate_size,
                              config.num_experts_per_tok, bool(config.norm_topk_prob), dtype, parallel, shared)

    def load_weights(self, tensors: dict[str, torch.Tensor], loaded_elsewhere: set[str] = frozenset()) -> None:
        """Expert weights per expert (mlp.experts.N.gate/up/down_proj) or stacked, then the rest as Llama's."""
        rest, experts = load_expert_weights(self, tensors)
        super().load_weights(rest, experts | loaded_elsewhere)
