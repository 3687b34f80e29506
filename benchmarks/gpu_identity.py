"""Greedy identity on the device: tokenmill's tokens against transformers' on the same device.

Tiny random Llama, Qwen2 and Phi-3 in float32 (the conformance suite's models), then the embedded
SmolLM2 in float32 (token-identical expected) and bf16 (drift expected: the common prefix is reported,
next to transformers' own bf16 run against its float32 one as the yardstick).
"""

from __future__ import annotations

import gc
import random
from typing import Any, Callable

import torch

from tokenmill.conformance.tiny import VOCAB, build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.sampling_params import SamplingParams

Record = Callable[[str, Any], None]

TINY_FAMILIES = ("llama", "qwen2", "phi3")
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain gravity to a five-year-old.",
    "List three prime numbers and say why they are prime.",
    "Translate 'good morning' into Spanish, French and German.",
    "Write a Python function that reverses a string.",
    "What are the three states of matter?",
    "Give me a short motivational quote about learning.",
]


def reference_greedy(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy continuation on the model's own device, never stopping early."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt], device=device), attention_mask=torch.ones(1, len(prompt),
                             dtype=torch.long, device=device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def engine_tokens(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    return [[t.id for o in outs for t in o.new_tokens] for outs in outputs]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(expected: list[list[int]], batched: list[list[int]], alone: list[list[int]]) -> dict[str, Any]:
    """How many prompts came out identical batched and alone, and where the first one parted."""
    result = {"prompts": len(expected), "batched_equal": sum(e == b for e, b in zip(expected, batched)),
              "alone_equal": sum(e == a for e, a in zip(expected, alone))}
    for index, (e, b, a) in enumerate(zip(expected, batched, alone)):
        if e != b or e != a:
            run = "batched" if e != b else "alone"
            got = b if e != b else a
            result["first_difference"] = f"prompt {index} ({run}) at token {common_prefix(e, got)}"
            break
    return result


def release_memory() -> None:
    """Give the memory of models the caller has dropped back, so the next model fits."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def identity_tiny(backend: str, smoke: bool, record: Record) -> None:
    new_tokens = 8 if smoke else 32
    rng = random.Random(0)
    # Lengths from a few tokens to past a 16-token block several times over, so batches are ragged.
    lengths = (3, 17, 40) if smoke else (3, 17, 40, 90, 130)
    prompts = [[rng.randrange(4, VOCAB) for _ in range(length)] for length in lengths]
    for family in TINY_FAMILIES:
        try:
            tiny = build_tiny(family)
            engine = Engine(EngineConfig(backend=backend, dtype="float32", kv_cache_bytes=32 << 20, progress=False,
                                         max_num_batched_tokens=256), checkpoint=tiny.checkpoint())
            reference = tiny.reference.to(engine.device)
            expected = [reference_greedy(reference, p, new_tokens) for p in prompts]
            batched = engine_tokens(engine, prompts, new_tokens)
            alone = [engine_tokens(engine, [p], new_tokens)[0] for p in prompts]
            result = compare(expected, batched, alone)
            result["dtype"] = "float32"
            result["blocks_all_freed"] = engine.block_manager.num_free_blocks == engine.num_blocks
            record(family, result)
            del engine, reference, tiny
            release_memory()
        except Exception as exc:  # one family's failure must not hide the others'
            record(f"{family}_error", f"{type(exc).__name__}: {exc}")


def chat_prompts(tokenizer: Any, count: int) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False) for q in QUESTIONS[:count]]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def smollm2_reference(checkpoint: Any) -> Any:
    """transformers' float32 model of the checkpoint tokenmill loaded (on the host), before the engine takes it.

    Built from the loader's tensors, so both sides run the same weights; that tokenmill's GGUF load
    equals transformers' own is `tests/engine/test_smollm2.py`'s check, made on the CPU.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(checkpoint.config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(checkpoint.tensors, strict=False)
    tied = {"lm_head.weight"} if checkpoint.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint and transformers disagree: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model


def identity_smollm2_float32(backend: str, smoke: bool, record: Record) -> tuple[Any, list[list[int]], list[list[int]]]:
    """Returns transformers' float32 model (on the device), the prompts and its tokens, for the bf16 runs."""
    from tokenmill.loader import load_checkpoint

    count, new_tokens = (2, 8) if smoke else (8, 64)
    checkpoint = load_checkpoint(None, torch.float32, progress=False)
    reference = smollm2_reference(checkpoint)
    engine = Engine(EngineConfig(backend=backend, dtype="float32", kv_cache_bytes=256 << 20, progress=False,
                                 max_num_batched_tokens=256), checkpoint=checkpoint)
    reference = reference.to(engine.device)
    prompts = chat_prompts(engine.tokenizer, count)
    expected = [reference_greedy(reference, p, new_tokens) for p in prompts]
    batched = engine_tokens(engine, prompts, new_tokens)
    alone = [engine_tokens(engine, [p], new_tokens)[0] for p in prompts]
    for run, got in (("alone", alone), ("batched", batched)):
        record(f"float32 {run}", {"dtype": "float32", "prompts": count, "new_tokens": new_tokens,
                                  "equal": sum(e == g for e, g in zip(expected, got)),
                                  "common_prefix": [common_prefix(e, g) for e, g in zip(expected, got)]})
    del engine
    release_memory()
    return reference, prompts, expected


def identity_smollm2_bfloat16(engine: Engine, reference: Any, prompts: list[list[int]], expected: list[list[int]],
                              record: Record) -> None:
    """tokenmill's bf16 engine and transformers' bf16 run (the yardstick), each against float32 tokens.

    Leaves `reference` in bf16 (`Module.to` works in place), as the throughput step wants it.
    """
    new_tokens = len(expected[0])

    def transformers_bf16() -> list[list[int]]:
        reference.to(torch.bfloat16)
        return [reference_greedy(reference, p, new_tokens) for p in prompts]

    for name, run in (("bfloat16 batched", lambda: engine_tokens(engine, prompts, new_tokens)),
                      ("transformers bfloat16 (yardstick)", transformers_bf16)):
        got = run()
        record(name, {"dtype": "bfloat16", "prompts": len(prompts), "new_tokens": new_tokens,
                      "equal": sum(e == g for e, g in zip(expected, got)),
                      "common_prefix": [common_prefix(e, g) for e, g in zip(expected, got)]})
