"""Which method runs the model's linear layers, chosen once when the engine is built.

A pre-quantized checkpoint's format picks the backend's method for it; otherwise `--quantize` names one,
or the backend's dense method runs. The chosen method also decides whether the prepared weights can be
cached on disk (`tokenmill.weight_cache`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from tokenmill.backend import Backend
from tokenmill.errors import ValidationError
from tokenmill.interfaces import QuantMethod
from tokenmill.loader import Checkpoint, single_file_checkpoint
from tokenmill.loader.quantized_checkpoints import CHECKPOINT_FORMATS
from tokenmill.parallel import ParallelContext
from tokenmill.weight_cache import PreparedWeights, cacheable

if TYPE_CHECKING:
    from tokenmill.config import EngineConfig

logger = logging.getLogger(__name__)


def linear_method(config: EngineConfig, backend: Backend, dtype: torch.dtype) -> QuantMethod | None:
    """How the linear layers run: `--quantize`'s method, else the backend's dense method (None: F.linear)."""
    if config.quantize:
        return backend.quantization_method(config.quantize)
    return backend.dense_linear_method(dtype)


def checkpoint_method(config: EngineConfig, backend: Backend, dtype: torch.dtype,
                      checkpoint: Checkpoint) -> QuantMethod | None:
    """The backend's method for a pre-quantized checkpoint (None for a dense one), refused before any
    layer is built where the backend runs no method for its format, or where --quantize asks for another."""
    weights = checkpoint.quantized_weights
    weight_format = next(iter(weights.values())).format if weights else None
    if not weights:
        if config.quantize in CHECKPOINT_FORMATS and config.quantize not in backend.quantization_methods:
            raise ValidationError(f"--quantize {config.quantize} names a pre-quantized checkpoint format, and this "
                                  "checkpoint is not quantized: start it without, or with a method the backend offers")
        return None
    description = checkpoint.quantization or "pre-quantized"
    if config.quantize and config.quantize != weight_format:  # TGI's `--quantize gptq` names the format itself
        raise ValidationError(f"the checkpoint is already quantized ({description}): start it without "
                              f"--quantize {config.quantize}")
    method = backend.checkpoint_method(dtype, weight_format, description)
    logger.info("pre-quantized checkpoint (%s): %d linear layers run by %s", description, len(weights), method.name)
    return method


def prepared_weights_entry(config: EngineConfig, backend: Backend, dtype: torch.dtype,
                           parallel: ParallelContext) -> PreparedWeights | None:
    """The cache entry for this model's prepared weights, where there can be one: a cache dir, one
    checkpoint file, a linear method that serializes, a single rank. An entry exists only where the
    core's model ran on this backend before: a backend running its own model never writes one."""
    if config.cache_dir is None or config.load_format == "dummy" or parallel.is_parallel:
        return None
    if config.quantize in CHECKPOINT_FORMATS:  # TGI's name of a safetensors checkpoint's own format
        return None
    method = linear_method(config, backend, dtype)
    source = single_file_checkpoint(config.model_id) if cacheable(method) else None
    return None if source is None else PreparedWeights.locate(config.cache_dir, source, method, dtype)
