"""Qwen3: the Llama block with a per-head RMSNorm on queries and keys before RoPE, no biases."""

from tokenmill.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
