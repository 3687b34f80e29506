"""Qwen3-MoE: the Qwen3 block (per-head q/k RMSNorm, no biases) with Qwen2-MoE's sparse layers, without the
shared expert; routing weights renormalized over the chosen experts when `norm_topk_prob` (true in the
released checkpoints)."""

from __future__ import annotations

from tokenmill.models.qwen2_moe import Qwen2MoeForCausalLM


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    has_shared_expert = False
    qk_norm = True
    qkv_bias = False
