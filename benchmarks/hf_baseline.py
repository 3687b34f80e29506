"""Plain PyTorch baseline: transformers' `generate` on the same model, batch 1 and a padded static batch."""

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.load import OUTPUT_TOKENS
from benchmarks.prompts import PROMPTS


def _tokens_per_second(model, tokenizer, prompts: list[str]) -> float:
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    batch = tokenizer(chats, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**batch, max_new_tokens=OUTPUT_TOKENS, min_new_tokens=OUTPUT_TOKENS,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    generated = (output.shape[1] - batch["input_ids"].shape[1]) * len(prompts)
    return generated / seconds


def transformers_baseline(hf_folder: Path, threads: int, batch_size: int = 16) -> dict:
    """Output tok/s of `generate` (greedy, 128 new tokens) in fp32 and bf16, alone and batched."""
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(hf_folder, padding_side="left")
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=dtype).eval()
        short = [p for p in PROMPTS if len(p) < 200]
        batch = (short * batch_size)[:batch_size]
        name = str(dtype).removeprefix("torch.")
        results[f"{name} batch 1"] = round(_tokens_per_second(model, tokenizer, short[:1]), 1)
        results[f"{name} batch {batch_size} (padded)"] = round(_tokens_per_second(model, tokenizer, batch), 1)
    return results
