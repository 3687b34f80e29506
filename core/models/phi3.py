"""Phi-3: the Llama block, with q/k/v and gate/up already fused in the checkpoint."""

from typing import Any

from tokenmill.layers.rotary import rope_parameters
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.parallel import SINGLE_RANK, ParallelContext


class Phi3ForCausalLM(LlamaForCausalLM):
    packed = {"qkv_proj": ("qkv_proj", None), "gate_up_proj": ("gate_up_proj", None)}

    def __init__(self, config: Any, make_attention, dtype, parallel: ParallelContext = SINGLE_RANK):
        if rope_parameters(config)["rope_type"] not in ("default", "linear"):
            raise ValueError("Phi-3 with long-context RoPE scaling (longrope) is not supported yet; "
                             "use a 4k-context Phi-3 checkpoint")
        super().__init__(config, make_attention, dtype, parallel)
