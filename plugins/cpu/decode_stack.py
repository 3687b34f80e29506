"""Whole decode steps of a Llama-family model in one C call (csrc/decode_stack.c): the CPU backend's
`tokenmill_compile_model`, a captured forward for the step shape that dominates serving.

Module by module, a batch-1 decode step of SmolLM2-135M spent ~6 ms of its ~12 in Python dispatch
(~300 module calls, tensor allocations and argument checks for kernels of a few microseconds each).
The C call chains the very kernels those modules call, with the same arguments, so its hidden states
are bit-identical to theirs. It takes every step the attention takes row by row (`attends_by_rows`):
plain decodes, speculative decoding's verification (a sequence's last token and its drafts), prompts
over contexts whose keys and values stay in cache, and steps mixing them, each query token a row of its
own whose context ends at its position (`row_contexts`), as the module path's attention does for such
queries. Every kernel computes a row alone, the same whatever the batch, so a
draft token's logits are those a one-token decode at its position gets: greedy output is the same with
and without `--speculate`. Its RoPE reads the model's cos/sin table, so every scaling baked into that
table (linear, llama3, yarn with its attention factor, a GGUF's rope_freqs) runs here as in the modules.
Qwen2's q/k/v biases, Qwen3's q/k norms and one sliding window for every layer (Mistral's) run in it too.
Prefill chunks over longer contexts, and models or configurations it does not cover (other biases, a window
on some layers only (Gemma 2 and 3, Qwen2's max_window_layers), mixture-of-experts layers, other linear
methods, RoPE computed per step: dynamic NTK, longrope), run module by module: `_layer_plan` takes a layer
only if its MLP is exactly `LlamaMLP`. So do steps in which a token uses a LoRA adapter (the C step has no
LoRA): base-model steps of a server with adapters still take the C path.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from tokenmill.interfaces import AttentionMetadata
from tokenmill.layers.linear import Linear
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from tokenmill.plugins.cpu.attention import CPUPagedAttention, attends_by_rows, row_contexts
from tokenmill.plugins.cpu.layer_ops import CPUFusedLayerOps
from tokenmill.plugins.cpu.quant import (
    DENSE_FORMAT,
    GGML_MAX_ROWS,
    GROUPED_FORMAT,
    PackedBF16Weight,
    PackedGGMLWeight,
    PackedGroupedWeight,
)

try:
    from tokenmill.plugins.cpu import _decode_stack
except ImportError:  # pragma: no cover - depends on the build
    _decode_stack = None


def _linear_plan(linear: Linear, bias_allowed: bool = False) -> list[int] | None:
    """(weight and format below GGML_MAX_ROWS rows, weight and format from there, out, in) as decode_stack.c's
    LinearPlan, if it can run the linear; a bias only where the caller adds it (`bias_allowed`)."""
    prepared = linear.quantized
    if linear.bias is not None and not (bias_allowed and linear.bias.dtype == torch.bfloat16):
        return None
    if not isinstance(prepared, (PackedGGMLWeight, PackedBF16Weight, PackedGroupedWeight)):
        return None  # another method (--quantize int8, oneDNN) or none
    if prepared.in_features % 2:
        return None
    if isinstance(prepared, PackedGroupedWeight):  # its kernel takes every row count itself
        kernels = [prepared.packed.data_ptr(), GROUPED_FORMAT] * 2
    elif isinstance(prepared, PackedGGMLWeight):
        kernels = [field for rows in (1, GGML_MAX_ROWS)
                   for field in (prepared.kernel_weight(rows).packed.data_ptr(), prepared.kernel_code(rows))]
    else:
        kernels = [prepared.packed.data_ptr(), DENSE_FORMAT] * 2
    return kernels + [prepared.out_features, prepared.in_features]


def _layer_plan(layer: nn.Module, eps: float) -> list[int] | None:
    """decode_stack.c's LayerPlan for a Llama decoder layer (with Qwen2's q/k/v biases or Qwen3's q/k norms, or
    neither), or None where it differs."""
    if not (type(layer) is LlamaDecoderLayer and type(layer.self_attn) is LlamaAttention
            and type(layer.mlp) is LlamaMLP):
        return None
    attention, mlp = layer.self_attn, layer.mlp
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    head_norms = [attention.q_norm, attention.k_norm] if attention.q_norm is not None else []
    if any(n.eps != eps or n.offset != 0.0 or n.weight.dtype != torch.bfloat16 for n in norms + head_norms):
        return None
    if not all(isinstance(module.ops, CPUFusedLayerOps) for module in (*norms, *head_norms, mlp)):
        return None
    linears = [_linear_plan(attention.qkv_proj, bias_allowed=True)]
    linears += [_linear_plan(linear) for linear in (attention.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    if any(plan is None for plan in linears):
        return None
    bias = attention.qkv_proj.bias
    extras = [0 if bias is None else bias.data_ptr()] + ([n.weight.data_ptr() for n in head_norms] or [0, 0])
    return [norms[0].weight.data_ptr(), norms[1].weight.data_ptr()] + [field for plan in linears for field in plan] + extras


def _computes_the_llama_forward(model: nn.Module) -> bool:
    """Whether `model` computes what decode_stack.c transcribes: `LlamaForCausalLM.forward` over full RoPE.

    Other families (Gemma's scaled embeddings and extra norms, Granite's multipliers, Phi-2's parallel
    block, LayerNorms, partial RoPE) are other classes, and a Llama subclass that overrides `forward`
    computes something else: all of them run module by module rather than get the C step's wrong numbers.
    Layer by layer, `_layer_plan` asks the same of the blocks.
    """
    return (isinstance(model, LlamaForCausalLM) and type(model).forward is LlamaForCausalLM.forward
            and type(model.rotary) is RotaryEmbedding)


class DecodeStack:
    """The captured decode step of one model; `supports` says which steps it takes."""

    def __init__(self, model: LlamaForCausalLM, plan: torch.Tensor, attention: CPUPagedAttention):
        self.model = model
        self.plan = plan  # (num_layers, 29) int64; the tensors it points into live in the model
        # The model's LoRA adapters (any adapted linear's), whose running step says whether a token uses one.
        self.lora = next((module.lora.adapters for module in model.modules()
                          if isinstance(module, Linear) and module.lora is not None), None)
        self.spec = attention.spec
        self.block_size = attention.block_size
        # bf16, or the one-byte format (--kv-cache-dtype) the C step quantizes keys and values to as it writes
        # them, rounding as the module path's PyTorch code does, byte for byte.
        self.cache_code = attention.cache_code
        config = model.config
        self.shape = (config.hidden_size, self.spec.num_heads, self.spec.num_kv_heads, self.spec.head_dim,
                      config.intermediate_size)
        self._caches: tuple[Sequence[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def build(cls, model: nn.Module) -> DecodeStack | None:
        """The captured step for `model`, or None where the C path does not cover it."""
        if _decode_stack is None or not _decode_stack.available():
            return None
        if not _computes_the_llama_forward(model):
            return None
        if model.parallel.is_parallel:
            return None  # a sharded model reduces over ranks between the matmuls; the C step has no collectives
        if model.embed_tokens.dtype != torch.bfloat16 or not isinstance(model.norm.ops, CPUFusedLayerOps):
            return None
        backends = {id(layer.self_attn.attn.backend): layer.self_attn.attn.backend for layer in model.layers}
        if len(backends) != 1:
            return None
        (attention,) = backends.values()
        spec = attention.spec
        if not (isinstance(attention, CPUPagedAttention) and attention.kernel_decodes
                and spec.dtype == torch.bfloat16 and spec.head_dim % 2 == 0 and model.norm.offset == 0.0
                and (attention.format is not None or attention.storage_dtype == torch.bfloat16)):
            return None
        plans = [_layer_plan(layer, model.norm.eps) for layer in model.layers]
        if any(plan is None for plan in plans):
            return None
        return cls(model, torch.tensor(plans, dtype=torch.int64), attention)

    def supports(self, metadata: AttentionMetadata) -> bool:
        # A step padded to a shape bucket (its last real token before the end) runs module by module:
        # the C step would write its padding tokens' keys at slot -1.
        return (attends_by_rows(metadata, self.spec)
                and int(metadata.query_start_loc[-1]) == metadata.slot_mapping.shape[0]
                and (self.lora is None or self.lora.batch is None))

    def _cache_pointers(self, kv_caches: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per layer, the key and value blocks' addresses (the engine's caches never move)."""
        if self._caches is None or self._caches[0] is not kv_caches:
            pointers = [[cache[0].data_ptr(), cache[1].data_ptr()] for cache in kv_caches]
            self._caches = (kv_caches, torch.tensor(pointers, dtype=torch.int64))
        return self._caches[1]

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: Sequence[torch.Tensor],
                 metadata: AttentionMetadata) -> torch.Tensor:
        model, spec = self.model, self.spec
        hidden = model.embed_tokens(input_ids)
        out = torch.empty_like(hidden)
        positions = positions.contiguous()
        slots = metadata.slot_mapping.contiguous()
        block_tables, seq_lens = metadata.block_tables, metadata.seq_lens
        if metadata.max_query_len > 1:  # the C step attends one row per query token
            query_lens = metadata.query_start_loc[1:] - metadata.query_start_loc[:-1]
            block_tables, seq_lens = row_contexts(query_lens, seq_lens, block_tables, input_ids.shape[0])
        block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()
        hidden_size, num_heads, num_kv_heads, head_dim, intermediate = self.shape
        # The linears split the decode rows from the prompt rows as PackedBF16Linear.matmul does.
        decode_rows = metadata.num_decode_tokens
        if decode_rows is None:
            decode_rows = hidden.shape[0]
        _decode_stack.decode(
            hidden.data_ptr(), out.data_ptr(), self.plan.data_ptr(), self._cache_pointers(kv_caches).data_ptr(),
            len(model.layers), model.norm.weight.data_ptr(), hidden.shape[0], decode_rows, hidden_size, num_heads,
            num_kv_heads, head_dim, intermediate, GGML_MAX_ROWS, model.norm.eps, positions.data_ptr(), slots.data_ptr(),
            block_tables.data_ptr(), seq_lens.data_ptr(), block_tables.stride(0), self.block_size,
            int(seq_lens.sum()), model.rotary.cos.data_ptr(), model.rotary.sin.data_ptr(), spec.scale,
            torch.get_num_threads(), self.cache_code, spec.sliding_window or 0,
        )
        return out


class CapturedForward:
    """The model's forward, with pure decode steps taken by its `DecodeStack`."""

    def __init__(self, model: nn.Module, stack: DecodeStack):
        self.model = model
        self.stack = stack

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: Sequence[torch.Tensor],
                 metadata: AttentionMetadata) -> torch.Tensor:
        if self.stack.supports(metadata):
            return self.stack(input_ids, positions, kv_caches, metadata)
        return self.model(input_ids, positions, kv_caches, metadata)


def compile_model(model: nn.Module) -> Any:
    """`CapturedForward` where the decode stack covers the model, else the model itself."""
    stack = DecodeStack.build(model)
    return model if stack is None else CapturedForward(model, stack)
