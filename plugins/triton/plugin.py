"""The hook implementations the Triton-based GPU backends share; each plugin is one configured instance.

cuda, rocm and xpu run the same kernels and differ in how they find their hardware, which torch
runtime module drives it, which collective library they use and whether graphs and native fp8 are
there. A plugin module builds a `TritonGpuPlugin` with those facts and registers the instance under
its entry point (``cuda = "tokenmill.plugins.cuda:plugin"``). Kernel modules are imported inside the
hooks, never at import, so a process that only discovers backends never imports Triton, and an
interpreter run can set Triton's interpreter switch before the kernels are defined.
"""

from __future__ import annotations

import os
from typing import Any, Callable

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
    MemoryRequest,
    QuantMethod,
)
from tokenmill.layers.moe import graph_capturable
from tokenmill.parallel import TorchDistributedCommunicator


class TritonGpuPlugin:
    """A GPU backend on the shared Triton kernels.

    `runtime` is a zero-argument function returning the `GpuRuntime` (resolved late: the torch module
    it names only works on a build with that hardware); `native_fp8` says, once a device is set up,
    whether the GPU multiplies fp8 natively; `graphs` whether decode steps may be captured.
    """

    def __init__(self, discover: Callable[[], Discovery], runtime: Callable[[], Any], dist_backend: str,
                 graphs: bool, native_fp8: Callable[[], bool]):
        self._discover = discover
        self._runtime = runtime
        self._dist_backend = dist_backend
        self._graphs = graphs
        self._native_fp8 = native_fp8
        self._interpreting = False

    @hookimpl
    def tokenmill_ray_resources(self, num_devices: int) -> dict[str, float]:
        return {"GPU": float(num_devices)}  # Ray counts NVIDIA, AMD and Intel GPUs alike as "GPU"

    @hookimpl
    def tokenmill_discover(self) -> Discovery:
        return self._discover()

    @hookimpl
    def tokenmill_init_device(self, device_index: int) -> DevicePlatform:
        return self._runtime().init_device(device_index)

    @hookimpl
    def tokenmill_interpreter_platform(self) -> DevicePlatform:
        # Triton's interpreter runs every kernel on host tensors; it must be on before a kernel is defined.
        os.environ["TRITON_INTERPRET"] = "1"
        self._interpreting = True
        return DevicePlatform(torch.device("cpu"), (torch.float32, torch.bfloat16, torch.float16), torch.bfloat16,
                              "Triton interpreter on the CPU")

    @hookimpl
    def tokenmill_memory_budget(self, device: torch.device, request: MemoryRequest) -> int:
        return self._runtime().memory_budget(device, request, graphs=self._graphs)

    @hookimpl
    def tokenmill_kv_cache_layout(self, shape: KVCacheShape, device: torch.device) -> KVCacheLayout:
        from tokenmill.plugins.triton.attention import TritonKVCacheLayout

        return TritonKVCacheLayout(shape, device)

    @hookimpl
    def tokenmill_attention_backend(self, spec: AttentionSpec, layout: KVCacheLayout) -> AttentionBackend:
        from tokenmill.plugins.triton.attention import TritonPagedAttention

        return TritonPagedAttention(spec, layout)

    @hookimpl
    def tokenmill_layer_ops(self, dtype: torch.dtype) -> LayerOps:
        from tokenmill.plugins.triton.layer_ops import TritonLayerOps

        return TritonLayerOps()

    @hookimpl
    def tokenmill_quantization_methods(self) -> list[QuantMethod]:
        from tokenmill.plugins.triton.quant import quantization_methods

        return quantization_methods(native_fp8=not self._interpreting and self._native_fp8())

    @hookimpl
    def tokenmill_communicator(self, world_size: int, rank: int) -> Communicator:
        return TorchDistributedCommunicator(self._dist_backend, world_size, rank)

    @hookimpl
    def tokenmill_compile_model(self, model: torch.nn.Module, capture_sizes: tuple[int, ...] | None) -> Any:
        if not self._graphs or self._interpreting or capture_sizes == () or not graph_capturable(model):
            return model  # graphs off, or experts run by a method that syncs with the host: eager
        from tokenmill.layers.rotary import context_length, rope_depends_on_length
        from tokenmill.plugins.triton.attention import TritonPagedAttention
        from tokenmill.plugins.triton.graphs import DEFAULT_CAPTURE_SIZES, DecodeGraphs, TorchGraphCapture

        attention = next((m.backend for m in model.modules() if isinstance(getattr(m, "backend", None),
                                                                          TritonPagedAttention)), None)
        if attention is None:
            return model  # a model whose attention is not ours (an executor-owned model): eager
        if rope_depends_on_length(model.config):
            return model  # its rotation is computed per step from host-read lengths: not capturable
        return DecodeGraphs(model, TorchGraphCapture(self._runtime().module), capture_sizes or DEFAULT_CAPTURE_SIZES,
                            attention.block_size, context_length(model.config))
