"""The core's model built and given its weights: from the checkpoint, or from the prepared-weights cache.

The engine picks the model class and the linear method (`tokenmill.linear_methods`); this module builds
the model, puts the weights in, prepares the linear layers, and points the layers at the backend's ops.
The code here derives the cached prepared weights, so `tokenmill.weight_cache` keys its entries on it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from tokenmill.backend import Backend
from tokenmill.errors import ValidationError
from tokenmill.interfaces import GGMLWeight, LayerOps, QuantMethod
from tokenmill.layers.moe import experts_of, prepare_experts
from tokenmill.loader import Checkpoint, build_dummy_model, load_checkpoint
from tokenmill.loader.quantized_checkpoints import quantized_to
from tokenmill.weight_cache import PreparedWeights

if TYPE_CHECKING:
    from tokenmill.config import EngineConfig

logger = logging.getLogger(__name__)


def check_model_implementation(implementation: str, config: EngineConfig, checkpoint: Checkpoint) -> None:
    """Say whose code runs the model; refuse what the transformers fallback cannot do."""
    architecture = (getattr(checkpoint.config, "architectures", None) or ["?"])[0]
    if implementation == "tokenmill":
        logger.info("model %s: tokenmill's own implementation", architecture)
        return
    logger.info("model %s: no tokenmill implementation, running transformers' modeling code (the transformers "
                "fallback) with tokenmill's paged attention", architecture)
    lacking = [flag for flag, asked in (("--quantize", config.quantize), ("--lora-adapters", config.lora_adapters),
                                        ("--load-format dummy", config.load_format == "dummy"),
                                        ("a pre-quantized checkpoint", bool(checkpoint.quantized_weights)))
               if asked]
    if lacking:
        raise ValidationError(f"{architecture} runs on the transformers fallback, which does not take "
                              f"{', '.join(lacking)}; start it without")


def load_model(model_class: Callable[..., nn.Module], config: EngineConfig, checkpoint: Checkpoint,
               make_attention: Callable, dtype: torch.dtype, device: torch.device, method: QuantMethod | None,
               prepared_weights: PreparedWeights | None, restoring: bool) -> nn.Module:
    """`model_class`'s model on `device` with its linear layers prepared by `method` (None: left dense).

    Where `restoring`, the weights come from `prepared_weights`; an entry that does not fit is given up
    and the checkpoint's weights are read after all. Weights read from the checkpoint are prepared and,
    where there is an entry to write, cached. The checkpoint's tensors are emptied: the model owns them.
    """
    restored = False
    if checkpoint.format == "dummy":
        model = build_dummy_model(model_class, checkpoint.config, make_attention, dtype, device, config.seed)
    else:
        model = model_class(checkpoint.config, make_attention, dtype)
        restored = restoring and prepared_weights.restore(model, method)
        if restoring and not restored:  # the entry was unusable: read the checkpoint's weights after all
            loaded = load_checkpoint(config.model_id, dtype, progress=config.progress,
                                     cache_dir=config.cache_dir, load_format=config.load_format)
            checkpoint.tensors, checkpoint.ggml_weights = loaded.tensors, loaded.ggml_weights
        if not restored:
            if checkpoint.quantized_weights:  # first: those layers then expect no dense weight
                model.load_quantized_weights({k: quantized_to(v, device)
                                              for k, v in checkpoint.quantized_weights.items()})
            model.load_weights({k: v.to(device) for k, v in checkpoint.tensors.items()})
    model.to(device).eval()
    checkpoint.tensors = {}  # the model owns the weights now
    checkpoint.quantized_weights = {}
    if not restored:
        _prepare_linears(model, method, checkpoint.ggml_weights)
        if prepared_weights is not None and not experts_of(model):
            prepared_weights.save(model, method)
    checkpoint.ggml_weights = {}
    return model


def _prepare_linears(model: nn.Module, method: QuantMethod | None, ggml_weights: dict[str, GGMLWeight]) -> None:
    from tokenmill.layers.linear import Linear

    if method is None:
        return
    model.load_ggml_weights(ggml_weights)
    for module in model.modules():
        if isinstance(module, Linear):
            module.quantize(method)


def use_backend_ops(model: nn.Module, backend: Backend, dtype: torch.dtype) -> None:
    """Give the expert stacks to the backend's MoE method and point every module that runs elementwise
    layer ops (norms, rotary, MLP) at the backend's."""
    if experts_of(model):
        prepare_experts(model, backend.moe_method(dtype))
    ops = backend.layer_ops(dtype)
    for module in model.modules():
        if isinstance(getattr(module, "ops", None), LayerOps):
            module.ops = ops
