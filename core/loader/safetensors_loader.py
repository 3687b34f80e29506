"""Hugging Face folders: config.json, safetensors shards, tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tokenmill.loader.errors import UnsupportedCheckpointError
from tokenmill.loader.quantized_checkpoints import QuantScheme, checkpoint_scheme, split_quantized


def load_hf_folder(path: Path, dtype: Any, progress: bool) -> Any:
    from transformers import AutoConfig, AutoTokenizer

    from tokenmill.loader.checkpoint import Checkpoint, parse_dtype

    if not (path / "config.json").exists():
        raise UnsupportedCheckpointError(f"{path} has no config.json (nor a single .gguf file)")
    config = AutoConfig.from_pretrained(str(path))
    checkpoint_dtype = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
    if isinstance(checkpoint_dtype, str):
        checkpoint_dtype = getattr(torch, checkpoint_dtype, None)
    default = checkpoint_dtype if checkpoint_dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    torch_dtype = parse_dtype(dtype, default)
    scheme = checkpoint_scheme(config)
    tensors = _read_safetensors(path, torch_dtype, progress, scheme)
    quantized = {}
    if scheme is not None:
        tensors, quantized = split_quantized(tensors, scheme)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    eos = getattr(config.get_text_config(), "eos_token_id", None)  # a vision-language config keeps it in text_config
    generation_config = path / "generation_config.json"
    if generation_config.exists():
        eos = json.loads(generation_config.read_text()).get("eos_token_id", eos)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    processor = load_processor(path, config)
    if processor is not None and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = processor.chat_template  # a VLM's template may live with its processor
    return Checkpoint(config, tensors, tokenizer, str(path), "safetensors", eos_ids, processor=processor,
                      quantized_weights=quantized, quantization=scheme.description if quantized else None)


def load_processor(path: Path, config: Any) -> Any:
    """The multimodal processor of a vision-language model's folder (one whose config has a `vision_config`
    and that ships a preprocessor config); None for any other."""
    from transformers import AutoProcessor

    if getattr(config, "vision_config", None) is None:
        return None
    if not (path / "preprocessor_config.json").exists() and not (path / "processor_config.json").exists():
        return None
    return AutoProcessor.from_pretrained(str(path))


def _read_safetensors(path: Path, dtype: torch.dtype, progress: bool,
                      scheme: QuantScheme | None = None) -> dict[str, torch.Tensor]:
    """Every tensor in `dtype`, except a quantized layer's (`scheme.owns`), kept as stored."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():  # only the shards it names: a repository may hold others (Mistral's consolidated.safetensors)
        files = [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UnsupportedCheckpointError(f"{path} has no .safetensors files (pickled .bin weights are not loaded)")
    tensors = {}
    with tqdm(desc="loading weights", unit="tensor", disable=not progress) as bar:
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    tensors[name] = tensor if scheme is not None and scheme.owns(name, tensor) else tensor.to(dtype)
                    bar.update(1)
    return tensors
