"""The chosen backend, its hooks resolved into plain objects once, when the engine is built.

The engine never calls pluggy in its step loop: it asks `Backend` for an attention object per layer
spec, a KV-cache layout, a communicator, and then calls those directly.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from torch import nn

from tokenmill import hookspecs
from tokenmill.errors import ValidationError
from tokenmill.interfaces import (
    AttentionBackend,
    AttentionSpec,
    Communicator,
    DevicePlatform,
    GreedyPick,
    KVCacheLayout,
    KVCacheShape,
    LayerOps,
    LoRAMethod,
    MemoryRequest,
    MoEMethod,
    QuantMethod,
    ShapeBuckets,
    SlotModel,
    TensorParallelPlan,
    TokenMask,
)
from tokenmill.registry import DEFAULTS_NAME, BackendRegistry, Selection, load_registry


class Backend:
    """One backend plugin seen through its hooks (plus the core's defaults for optional ones)."""

    def __init__(self, registry: BackendRegistry, name: str):
        self.registry = registry
        self.name = name
        self._hooks = {
            hook: registry.subset_caller(name, hook)
            for hook in dir(hookspecs)
            if hook.startswith("tokenmill_")
        }
        self._attention: dict[AttentionSpec, tuple[KVCacheLayout, AttentionBackend]] = {}

    def _call(self, hook: str, **kwargs: Any) -> Any:
        result = self._hooks[hook](**kwargs)
        if result is None:
            raise ValidationError(f"backend {self.name!r} returned nothing from {hook}")
        return result

    def init_device(self, device_index: int = 0) -> DevicePlatform:
        return self._call("tokenmill_init_device", device_index=device_index)

    def interpreter_platform(self) -> DevicePlatform | None:
        """Where the backend's kernels run interpreted on host tensors, or None if it has no interpreter."""
        return self._hooks["tokenmill_interpreter_platform"]()

    def memory_budget(self, device: torch.device, request: MemoryRequest) -> int:
        return int(self._call("tokenmill_memory_budget", device=device, request=request))

    def kv_cache_layout(self, shape: KVCacheShape, device: torch.device) -> KVCacheLayout:
        return self._call("tokenmill_kv_cache_layout", shape=shape, device=device)

    def attention(self, spec: AttentionSpec, layout: KVCacheLayout) -> AttentionBackend:
        """One attention object per distinct spec, shared by the layers that have it, over the latest layout
        asked for (another layout, as a cache of another dtype, gets its own)."""
        cached = self._attention.get(spec)
        if cached is None or cached[0] is not layout:
            cached = self._attention[spec] = (layout, self._call("tokenmill_attention_backend", spec=spec,
                                                                 layout=layout))
        return cached[1]

    def communicator(self, world_size: int, rank: int, device: torch.device) -> Communicator:
        return self._call("tokenmill_communicator", world_size=world_size, rank=rank, device=device)

    def tensor_parallel_plan(self, world_size: int) -> TensorParallelPlan:
        return self._call("tokenmill_tensor_parallel_plan", world_size=world_size)

    @cached_property
    def quantization_methods(self) -> dict[str, QuantMethod]:
        return {method.name: method for method in self._call("tokenmill_quantization_methods")}

    def quantization_method(self, name: str) -> QuantMethod:
        """The method `--quantize name` selects, validated against what this backend offers."""
        methods = self.quantization_methods
        if name not in methods:
            offered = ", ".join(sorted(methods)) or "none"
            raise ValidationError(f"backend {self.name!r} does not support quantization {name!r}; it offers: {offered}")
        return methods[name]

    def dense_linear_method(self, dtype: torch.dtype) -> QuantMethod | None:
        return self._hooks["tokenmill_dense_linear_method"](dtype=dtype)

    def checkpoint_method(self, dtype: torch.dtype, weight_format: str, description: str) -> QuantMethod:
        """The method that runs a pre-quantized checkpoint in `weight_format` (`QuantizedWeight.format`): the
        dense linear method if it takes the format, else the first quantization method that does. Refused
        (`description` says what the checkpoint is) with the formats this backend runs."""
        candidates = [self.dense_linear_method(dtype), *self.quantization_methods.values()]
        candidates = [method for method in candidates if method is not None]
        for method in candidates:
            if weight_format in method.checkpoint_formats:
                return method
        runs = sorted(set().union(*(method.checkpoint_formats for method in candidates)))
        raise ValidationError(f"backend {self.name!r} cannot run this {description} checkpoint with a "
                              f"{str(dtype).removeprefix('torch.')} model; the pre-quantized checkpoint formats "
                              f"it runs: {', '.join(runs) or 'none'}")

    def layer_ops(self, dtype: torch.dtype) -> LayerOps:
        """The backend's fused elementwise ops for `dtype`, or the PyTorch reference ops."""
        return self._hooks["tokenmill_layer_ops"](dtype=dtype) or LayerOps()

    def lora_method(self, dtype: torch.dtype) -> LoRAMethod:
        """The backend's way of adding LoRA adapters in `dtype`, or the reference segmented matmul."""
        return self._hooks["tokenmill_lora_method"](dtype=dtype) or LoRAMethod()

    def moe_method(self, dtype: torch.dtype) -> MoEMethod:
        """The backend's way of running mixture-of-experts layers in `dtype`, or the PyTorch reference."""
        return self._hooks["tokenmill_moe_method"](dtype=dtype) or MoEMethod()

    def token_mask(self) -> TokenMask:
        """The backend's way of applying grammar masks to logits (the reference `TokenMask` by default)."""
        return self._call("tokenmill_token_mask")

    def greedy_pick(self) -> GreedyPick:
        """The backend's way of picking greedy tokens and their log-probabilities (the reference by default)."""
        return self._call("tokenmill_greedy_pick")

    def shape_buckets(self, max_num_tokens: int, max_num_seqs: int) -> ShapeBuckets | None:
        return self._hooks["tokenmill_shape_buckets"](max_num_tokens=max_num_tokens, max_num_seqs=max_num_seqs)

    def compile_model(self, model: nn.Module, buckets: ShapeBuckets | None,
                      capture_sizes: tuple[int, ...] | None = None) -> Any:
        return self._call("tokenmill_compile_model", model=model, buckets=buckets, capture_sizes=capture_sizes)

    @cached_property
    def runs_own_model(self) -> bool:
        """Whether the plugin implements `tokenmill_model_executor`: it may then run the model from its config."""
        return any(impl.plugin_name != DEFAULTS_NAME
                   for impl in self._hooks["tokenmill_model_executor"].get_hookimpls())

    def model_executor(self, **kwargs: Any) -> SlotModel | None:
        """The backend's own model (see `tokenmill_model_executor` for the arguments), or None."""
        return self._hooks["tokenmill_model_executor"](**kwargs)


def resolve_backend(forced: str | None = None, registry: BackendRegistry | None = None) -> tuple[Backend, Selection]:
    """Discover the plugins, choose one (or the forced one), and return it with the reason."""
    registry = registry or load_registry()
    selection = registry.select(forced)
    return Backend(registry, selection.name), selection
