"""The CPU backend: bf16 where its kernels run it (native bf16 or AVX2), paged attention, gloo, int8 weights.

Hook implementations only; each delegates to the module that does the work.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.hookspecs import hookimpl
from tokenmill.interfaces import (
    AttentionBackend,
    AttentionSpec,
    Communicator,
    DevicePlatform,
    Discovery,
    KVCacheLayout,
    KVCacheShape,
    LayerOps,
    LoRAMethod,
    MemoryRequest,
    MoEMethod,
    QuantMethod,
)
from tokenmill.parallel import TorchDistributedCommunicator
from tokenmill.plugins.cpu import discover as _discover
from tokenmill.plugins.cpu import platform as _platform
from tokenmill.plugins.cpu.attention import CPUKVCacheLayout, CPUPagedAttention
from tokenmill.plugins.cpu.decode_stack import compile_model
from tokenmill.plugins.cpu.layer_ops import CPUFusedLayerOps, fused_layer_ops_available
from tokenmill.plugins.cpu.lora import MaskedLoRA
from tokenmill.plugins.cpu.moe import PackedBF16Experts
from tokenmill.plugins.cpu.greedy_pick import CGreedyPick
from tokenmill.plugins.cpu.token_mask import CTokenMask
from tokenmill.plugins.cpu.quant import (
    DequantizedFloatLinear,
    Int8ActivationLinear,
    Int8WeightOnly,
    OneDNNPackedLinear,
    PackedBF16Linear,
    bf16_gemm_available,
    int8_activations_available,
    onednn_linear_available,
)


@hookimpl
def tokenmill_discover() -> Discovery:
    return _discover.discover()


@hookimpl
def tokenmill_init_device(device_index: int) -> DevicePlatform:
    return _platform.init_device()


@hookimpl
def tokenmill_memory_budget(request: MemoryRequest) -> int:
    return _platform.memory_budget(request)


@hookimpl
def tokenmill_kv_cache_layout(shape: KVCacheShape, device: torch.device) -> KVCacheLayout:
    return CPUKVCacheLayout(shape, device)


@hookimpl
def tokenmill_attention_backend(spec: AttentionSpec, layout: KVCacheLayout) -> AttentionBackend:
    return CPUPagedAttention(spec, layout)


@hookimpl
def tokenmill_communicator(world_size: int, rank: int) -> Communicator:
    return TorchDistributedCommunicator("gloo", world_size, rank)


@hookimpl
def tokenmill_quantization_methods() -> list[QuantMethod]:
    methods = [Int8WeightOnly(), DequantizedFloatLinear()]
    return methods + [Int8ActivationLinear()] if int8_activations_available() else methods


@hookimpl
def tokenmill_dense_linear_method(dtype: torch.dtype) -> QuantMethod | None:
    # fp32 stays on F.linear (MKL), the kernel the fp32 reference results come from.
    if dtype != torch.bfloat16:
        return None
    if bf16_gemm_available():
        return PackedBF16Linear()
    return OneDNNPackedLinear() if onednn_linear_available() else None


@hookimpl
def tokenmill_layer_ops(dtype: torch.dtype) -> LayerOps | None:
    # bf16 only, like the dense linears: the fp32 reference results come from PyTorch's own ops.
    if dtype == torch.bfloat16 and fused_layer_ops_available():
        return CPUFusedLayerOps()
    return None


@hookimpl
def tokenmill_lora_method(dtype: torch.dtype) -> LoRAMethod | None:
    return MaskedLoRA(dtype)


@hookimpl
def tokenmill_moe_method(dtype: torch.dtype) -> MoEMethod | None:
    # bf16 with the packed kernel, like the dense linears; float32 keeps the reference (MKL's F.linear).
    if dtype == torch.bfloat16 and bf16_gemm_available() and fused_layer_ops_available():
        return PackedBF16Experts()
    return None


@hookimpl
def tokenmill_token_mask() -> CTokenMask:
    return CTokenMask()


@hookimpl
def tokenmill_greedy_pick() -> CGreedyPick:
    return CGreedyPick()


@hookimpl
def tokenmill_compile_model(model: torch.nn.Module, buckets) -> Any:
    # Pure decode steps of Llama-family models as one C call; everything else eager.
    return compile_model(model)
