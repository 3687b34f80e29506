"""Loading a whole checkpoint for the engine: its config, its weights under transformers' parameter names,
and its tokenizer; the model implementations in `tokenmill.models` take it from there.

Reached through `tokenmill.loader` (`load_checkpoint`, `Checkpoint`, ...), which imports this module, and
torch with it, only when one of these names is first used.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tokenmill.interfaces import GGMLWeight, QuantizedWeight
from tokenmill.loader import check_load_format, default_model_path
from tokenmill.loader.dummy import load_dummy_checkpoint
from tokenmill.loader.errors import UnsupportedCheckpointError
from tokenmill.loader.gguf_config_cache import cached_gguf_config
from tokenmill.loader.gguf_file import GGUFFile
from tokenmill.loader.gguf_loader import config_from_gguf, tensors_from_gguf
from tokenmill.loader.gguf_tokenizer import cached_gguf_tokenizer
from tokenmill.loader.hub import resolve_hub_id
from tokenmill.loader.safetensors_loader import load_hf_folder

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
    cached_config: bool = False,
) -> Checkpoint:
    """Load `model_id` (default: the embedded SmolLM2 GGUF).

    `dtype="auto"` keeps a safetensors checkpoint's `torch_dtype` and gives float32 for GGUF. A hub
    id is looked up in the local Hugging Face cache only: `fetch` downloads it first (the CLI does, at
    start, as TGI's launcher does). `cache_dir`, when given, keeps the tokenizer
    built from a GGUF's metadata so later starts skip rebuilding it. `load_format="dummy"` reads no
    weights: see `tokenmill.loader.dummy`. `weights=False` reads a GGUF's config and tokenizer only (no
    tensors): for an engine that restores its prepared weights from its cache (`tokenmill.weight_cache`).
    `cached_config=True` lets a GGUF's config come back from `cache_dir` as transformers' base config class
    (`tokenmill.loader.gguf_config_cache`): for the core's own models, which read only its fields.
    """
    if check_load_format(load_format) == "dummy":
        return load_dummy_checkpoint(model_id, dtype)
    model_id = model_id or default_model_path()
    path = Path(model_id).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype, progress, cache_dir, weights, cached_config)
    if path.exists() and not path.is_dir():
        raise UnsupportedCheckpointError(f"{path} is neither a .gguf file nor a model folder")
    if not path.exists():
        path = resolve_hub_id(model_id, revision)
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").exists() and len(ggufs) == 1:
        return _load_gguf(ggufs[0], dtype, progress, cache_dir, weights, cached_config)
    return load_hf_folder(path, dtype, progress)


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


def _load_gguf(path: Path, dtype: str | torch.dtype | None, progress: bool, cache_dir: Path | None,
               weights: bool = True, cached_config: bool = False) -> Checkpoint:
    timings = {}
    start = time.perf_counter()
    gguf = functools.cache(lambda: GGUFFile(path))  # not parsed at all where the config is cached and no weights read
    config_cache = cache_dir if cached_config else None
    config = cached_gguf_config(path, config_cache, lambda: config_from_gguf(gguf()))
    torch_dtype = parse_dtype(dtype, torch.float32)
    timings["metadata"] = time.perf_counter() - start

    start = time.perf_counter()
    tensors, ggml_weights = {}, {}
    if weights:
        with tqdm(total=len(gguf().tensors), desc="loading weights", unit="tensor", disable=not progress) as bar:
            tensors, ggml_weights = tensors_from_gguf(gguf(), config, torch_dtype, progress=bar.update)
    timings["weights"] = time.perf_counter() - start

    start = time.perf_counter()
    tokenizer = cached_gguf_tokenizer(path, cache_dir)
    timings["tokenizer"] = time.perf_counter() - start
    eos = config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return Checkpoint(config, tensors, tokenizer, str(path), "gguf", eos_ids, timings, ggml_weights)
