"""`make gguf-check`: every GGUF type `llama-quantize` makes of the embedded model runs from its own blocks.

For each file of `benchmarks.quantized_files` (made, and llama-quantize built, if missing):
- each quantized matrix's `QuantizedWeight` dequantizes to gguf-py's values bit for bit (conversion time
  reported);
- tokenmill loads it in bf16 (the served dtype) and every linear layer stored in a quantized type is
  prepared from its blocks (`Linear.prepared_from`: the method's `prepare_ggml` or `prepare_quantized`),
  none from its dense copy; the load time is reported;
- in float32 its greedy output equals transformers' on the same file (which dequantizes GGUF weights
  with gguf-py), on a few prompts of 32 tokens.
Not part of `make test`: the build takes about 9 minutes and the check a few more.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from benchmarks.quantized_files import TYPES, linear_types, quantized_file

PROMPTS = ("The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):")
NEW_TOKENS = 32


def _engine(path: Path, dtype: str):
    from tokenmill.engine import Engine, EngineConfig

    return Engine(EngineConfig(model_id=str(path), backend="cpu", dtype=dtype, kv_cache_bytes=64 << 20,
                               enable_prefix_caching=False, progress=False))


def prepared_paths(engine) -> Counter:
    """(path, ggml types) -> how many linear layers were prepared that way (types None: no blocks)."""
    from tokenmill.layers.linear import Linear

    return Counter(module.prepared_from for module in engine.model.modules()
                   if isinstance(module, Linear) and module.prepared_from is not None)


def _greedy(engine, prompts: list[list[int]]) -> list[list[int]]:
    from tokenmill.sampling_params import SamplingParams

    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    return [[t.id for o in output for t in o.new_tokens] for output in outputs]


def _transformers_greedy(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return [model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
            for prompt in prompts]


def normal_forms(path: Path) -> tuple[int, int, float]:
    """Every quantized matrix of the file as a `QuantizedWeight`: how many, how many dequantize to gguf-py's
    values bit for bit (a zero's sign aside), and the seconds the conversion took in all."""
    import numpy as np

    from tokenmill.interfaces import GGMLWeight
    from tokenmill.loader.ggml_blocks import GGML_BLOCK_TYPES, quantized_from_ggml
    from tokenmill.loader.gguf_file import GGUFFile

    file = GGUFFile(path)
    count = equal = 0
    seconds = 0.0
    for name, info in file.tensors.items():
        if len(info.shape) != 2 or info.ggml_type.name not in GGML_BLOCK_TYPES:
            continue
        raw = file.raw(name)
        start = time.perf_counter()
        weight = quantized_from_ggml(GGMLWeight(info.ggml_type.name, torch.from_numpy(raw), info.shape[1]))
        seconds += time.perf_counter() - start
        ours = weight.dequantize().numpy() + np.float32(0)
        count += 1
        equal += bool(np.array_equal(ours.view(np.int32), (file.load(name, raw) + np.float32(0)).view(np.int32)))
    return count, equal, seconds


def check(ggml_type: str) -> list[str]:
    """The failures for one file (empty: it passed), printing what was measured."""
    path = quantized_file(ggml_type)
    failures = []
    count, equal, seconds = normal_forms(path)
    print(f"{ggml_type}: {equal}/{count} quantized matrices dequantize from their QuantizedWeight as gguf-py does; "
          f"conversion {seconds:.2f} s in all", flush=True)
    if equal != count:
        failures.append(f"{count - equal} matrices dequantize otherwise than gguf-py")
    start = time.perf_counter()
    engine = _engine(path, "bfloat16")
    load_s = time.perf_counter() - start
    paths = prepared_paths(engine)
    dense = {key: count for key, count in paths.items() if key[0] == "prepare" and key[1] is not None}
    print(f"{ggml_type}: matrices {dict(linear_types(path))}; bf16 load {load_s:.1f} s; "
          f"linears prepared {dict(paths)}", flush=True)
    if not paths:
        failures.append("no linear method prepared the bf16 linears: nothing runs from blocks")
    if dense:
        failures.append(f"linears with blocks prepared from their dense copy: {dense}")
    del engine
    gc.collect()
    engine = _engine(path, "float32")
    prompts = [engine.tokenizer(prompt).input_ids for prompt in PROMPTS]
    ours = _greedy(engine, prompts)
    del engine
    gc.collect()
    theirs = _transformers_greedy(path, prompts)
    same = sum(a == b for a, b in zip(ours, theirs))
    print(f"{ggml_type}: float32 greedy equals transformers' on {same}/{len(prompts)} prompts", flush=True)
    if same != len(prompts):
        failures.append(f"float32 greedy differs from transformers': {ours} vs {theirs}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(TYPES), help="comma-separated llama-quantize types")
    args = parser.parse_args()
    failures = {ggml_type: check(ggml_type) for ggml_type in args.types.split(",")}
    failed = {name: problems for name, problems in failures.items() if problems}
    for name, problems in failed.items():
        print(f"FAILED {name}: " + "; ".join(problems), flush=True)
    print(f"gguf-check: {len(failures) - len(failed)}/{len(failures)} types passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
