"""Phi-3: the Llama block, with q/k/v and gate/up already fused in the checkpoint (128k-context
checkpoints use longrope: `tokenmill.layers.rotary`)."""

from tokenmill.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    packed = {"qkv_proj": ("qkv_proj", None), "gate_up_proj": ("gate_up_proj", None)}
