"""Quality next to speed: perplexity of each way tokenmill can serve the embedded model, on one fixed text.

The benchmarked server runs `make serve`'s defaults: bf16 activations over the GGUF's Q4_1 weights,
read from their own blocks (the exact dequantized values, not a new quantization). Beside it: the same
engine in float32, `--quantize int8`, and transformers' own float32 forward on the exported bf16-free
reference weights, all on the same tokens of `perplexity_text.txt` (plain English prose written for
this file, so no model has seen it).

The `--kv-cache-dtype` rows store keys and values in one byte each: the whole text as one prompt reads
them back through the prefill path; "16-token chunks" feeds it 16 tokens a step, which the decode
kernel (in the C decode stack) attends row by row, so those rows measure the decode path's reads.

The GGUF rows serve the embedded model in each type `llama-quantize` makes (`benchmarks.quantized_files`),
beside the bf16 GGUF they were all made from, each run from its own blocks in bf16.

The safetensors rows serve the embedded model as a pre-quantized checkpoint in each format tokenmill reads
(`benchmarks.quantized_safetensors`: GPTQ, AWQ, fp8, compressed-tensors, round-to-nearest from the bf16
HF export, which has its own row), in bf16 too.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

TEXT = Path(__file__).resolve().parent / "perplexity_text.txt"
SOURCE = "bf16"  # the dense checkpoint's name among `perplexities`' checkpoints: the others are made from it

# Engine configurations to score: name -> EngineConfig overrides.
MODES = {
    "tokenmill float32": {"dtype": "float32"},
    "tokenmill served default (bf16, Q4_1 blocks as stored)": {},
    "tokenmill --quantize int8 (bf16)": {"quantize": "int8"},
    "tokenmill --kv-cache-dtype fp8_e4m3": {"kv_cache_dtype": "fp8_e4m3"},
    "tokenmill --kv-cache-dtype fp8_e5m2": {"kv_cache_dtype": "fp8_e5m2"},
    "tokenmill --kv-cache-dtype int8": {"kv_cache_dtype": "int8"},
    "tokenmill served default, 16-token chunks": {"max_num_batched_tokens": 16},
    "tokenmill --kv-cache-dtype fp8_e4m3, 16-token chunks": {"kv_cache_dtype": "fp8_e4m3", "max_num_batched_tokens": 16},
}


def _perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


def _engine_perplexity(overrides: dict, token_ids: list[int]) -> float:
    from tokenmill.engine import Engine, EngineConfig
    from tokenmill.sampling_params import SamplingParams

    engine = Engine(EngineConfig(backend="cpu", progress=False, enable_prefix_caching=False, **overrides))
    (outputs,) = engine.generate([token_ids], SamplingParams(max_new_tokens=1, prompt_logprobs=True))
    return _perplexity([token.logprob for token in outputs[0].prompt_logprobs[1:]])


def _transformers_perplexity(token_ids: list[int]) -> float:
    from transformers import AutoModelForCausalLM

    from tokenmill.loader import default_model_path

    path = Path(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([token_ids])).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(token_ids[1:])[:, None])
    return _perplexity(logprobs.flatten().tolist())


def perplexities(threads: int, gguf_files: dict[str, Path] | None = None,
                 checkpoints: dict[str, Path] | None = None) -> dict:
    """Perplexity per mode on the fixed text, and the number of tokens scored; with `gguf_files` (GGUF
    type -> file, `benchmarks.quantized_files`) and `checkpoints` (format -> safetensors folder,
    `benchmarks.quantized_safetensors`), each served by tokenmill's default too (bf16)."""
    from tokenmill.loader import load_tokenizer

    torch.set_num_threads(threads)
    token_ids = load_tokenizer()(TEXT.read_text()).input_ids
    results = {"tokens": len(token_ids) - 1,
               "perplexity": {"transformers float32 (reference)": round(_transformers_perplexity(token_ids), 4)}}
    for name, overrides in MODES.items():
        results["perplexity"][name] = round(_engine_perplexity(overrides, token_ids), 4)
    for ggml_type, path in (gguf_files or {}).items():
        results["perplexity"][gguf_mode(ggml_type)] = round(_engine_perplexity({"model_id": str(path)}, token_ids), 4)
    for name, folder in (checkpoints or {}).items():
        results["perplexity"][checkpoint_mode(name)] = round(_engine_perplexity({"model_id": str(folder)}, token_ids), 4)
    return results


def gguf_mode(ggml_type: str) -> str:
    source = " (the quantized files' source)" if ggml_type == "BF16" else ", by llama-quantize"
    return f"tokenmill on the {ggml_type} GGUF{source}"


def checkpoint_mode(name: str) -> str:
    source = " (the quantized checkpoints' source)" if name == SOURCE else ", round-to-nearest"
    return f"tokenmill on the {name} safetensors{source}"


def safetensors_checkpoints() -> dict[str, Path]:
    """The bf16 HF export and each pre-quantized checkpoint made from it (written once, cached)."""
    from benchmarks.quantized_safetensors import quantized_checkpoints, source_folder

    return {SOURCE: source_folder(), **quantized_checkpoints()}


if __name__ == "__main__":  # python -m benchmarks.quality [--gguf-types] [--safetensors-formats]
    import sys

    from benchmarks.quantized_files import bf16_file, quantized_files

    files = {"BF16": bf16_file(), **quantized_files()} if "--gguf-types" in sys.argv else None
    folders = safetensors_checkpoints() if "--safetensors-formats" in sys.argv else None
    print(perplexities(threads=2, gguf_files=files, checkpoints=folders))
