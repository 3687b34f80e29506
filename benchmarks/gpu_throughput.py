"""Decode latency and throughput on the device: tokenmill's engine against transformers' batched `generate`.

Workload at every concurrency N: N requests of the same prompt length with distinct random token ids
(so prefix caching saves nothing transformers could not), a fixed number of new tokens past EOS,
submitted together; tokens/s is generated tokens over wall time. Every measurement is preceded by a
short untimed run of the same shape on other prompts (kernel compilation, graph capture, allocator).
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from benchmarks.gpu_identity import release_memory
from tokenmill.engine import Engine, EngineConfig
from tokenmill.sampling_params import SamplingParams

Record = Callable[[str, Any], None]

# transformers' variants tried at every level, the best one quoted. Static cache without torch.compile:
# compiling every batch size costs minutes of device time the check does not have.
HF_VARIANTS = {"dynamic cache": {}, "static cache": {"cache_implementation": "static", "disable_compile": True}}


@dataclass(frozen=True)
class Workload:
    levels: tuple[int, ...]
    prompt_tokens: int
    output_tokens: int
    max_num_batched_tokens: int

    def describe(self) -> str:
        return (f"N requests x {self.prompt_tokens} prompt tokens (random ids) -> {self.output_tokens} new tokens "
                f"each, ignore_eos, submitted together; N in {list(self.levels)}")


def prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Clear of the low ids, where the special tokens of most vocabularies sit.
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(count)]


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype.itemsize


def cache_bytes(config: Any, work: Workload) -> int:
    """KV cache for the largest level plus a quarter: the engine then takes what it needs, not all memory."""
    tokens = max(work.levels) * (work.prompt_tokens + work.output_tokens + 16)
    return int(1.25 * tokens * kv_bytes_per_token(config, torch.bfloat16))


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30, repeats: int = 10) -> float:
    """Bytes read plus bytes written per second by a large device-to-device copy (CUDA events)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / repeats
    del src, dst
    release_memory()
    return 2 * nbytes / seconds


def decode_latency(engine: Engine, prompt_tokens: int, steps: int, record: Record) -> None:
    """Batch-1 inter-token latency: the gaps between one request's successive tokens."""
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
    engine.generate(prompts(1, prompt_tokens, vocab, seed=1), params)
    engine.add_request("latency", prompts(1, prompt_tokens, vocab, seed=2)[0], params)
    stamps = []
    while engine.has_unfinished():
        if any(out.new_tokens for out in engine.step()):
            stamps.append(time.perf_counter())
    gaps_ms = sorted(1e3 * (b - a) for a, b in zip(stamps, stamps[1:]))  # the first token is the prefill's
    record("decode_steps", len(gaps_ms))
    record("inter_token_ms_median", round(statistics.median(gaps_ms), 3))
    record("inter_token_ms_p90", round(gaps_ms[int(0.9 * (len(gaps_ms) - 1))], 3))


def tokenmill_levels(engine: Engine, work: Workload, deadline: float, record: Record) -> None:
    vocab = engine.model_config.vocab_size
    results: dict[str, Any] = {}
    for level in work.levels:
        if time.time() > deadline:
            results[str(level)] = {"error": "skipped: out of time"}
            record("tokenmill", results)
            continue
        engine.generate(prompts(level, work.prompt_tokens, vocab, seed=10 + level),
                        SamplingParams(max_new_tokens=4, ignore_eos=True))
        batch = prompts(level, work.prompt_tokens, vocab, seed=level)
        start = time.perf_counter()
        outputs = engine.generate(batch, SamplingParams(max_new_tokens=work.output_tokens, ignore_eos=True))
        seconds = time.perf_counter() - start
        generated = sum(len(o.new_tokens) for outs in outputs for o in outs)
        results[str(level)] = {"tokens_per_s": round(generated / seconds, 1), "seconds": round(seconds, 3),
                               "generated": generated}
        record("tokenmill", results)


def _hf_run(model: Any, batch: torch.Tensor, new_tokens: int, options: dict[str, Any]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0, **options)
    out[:, -1].tolist()  # the wait for the device
    seconds = time.perf_counter() - start
    assert out.shape[1] - batch.shape[1] == new_tokens, "generate stopped early"
    return seconds


def transformers_levels(model: Any, work: Workload, vocab: int, deadline: float, record: Record) -> None:
    """Every variant at every level (equal prompt lengths: the left padding a mixed batch needs is moot)."""
    device = next(model.parameters()).device
    results: dict[str, Any] = {}
    for level in work.levels:
        entry: dict[str, Any] = {}
        for name, options in HF_VARIANTS.items():
            if time.time() > deadline:
                entry[name] = "skipped: out of time"
                continue
            try:
                _hf_run(model, torch.tensor(prompts(level, work.prompt_tokens, vocab, seed=10 + level),
                                            device=device), 4, options)
                seconds = _hf_run(model, torch.tensor(prompts(level, work.prompt_tokens, vocab, seed=level),
                                                      device=device), work.output_tokens, options)
                entry[name] = round(level * work.output_tokens / seconds, 1)
            except Exception as exc:  # one variant failing (e.g. static cache unsupported) leaves the other
                entry[name] = f"{type(exc).__name__}: {exc}"
        measured = {k: v for k, v in entry.items() if isinstance(v, float)}
        if measured:
            entry["best_variant"] = max(measured, key=measured.get)
            entry["best_tokens_per_s"] = measured[entry["best_variant"]]
        else:
            entry["error"] = "no variant ran"
        results[str(level)] = entry
        record("transformers", results)


def throughput(config: EngineConfig, hf_model: Callable[[torch.device], Any], work: Workload, deadline: float,
               record: Record, first: Callable[[Engine], None] | None = None) -> None:
    """tokenmill at every level, then (engine freed) transformers' `hf_model(device)` at every level.

    `first`, when given, runs on the warmed-up engine before the levels (sharing the engine's build).
    """
    record("workload", work.describe())
    engine = Engine(config)
    record("engine", {"load_s": round(engine.load_time_s, 2), "kv_blocks": engine.num_blocks,
                      "weights_bytes": sum(p.numel() * p.element_size() for p in engine.model.parameters())})
    vocab, device = engine.model_config.vocab_size, engine.device
    engine.warmup(progress=False)
    if first is not None:
        first(engine)
    try:
        tokenmill_levels(engine, work, deadline, record)
    except Exception as exc:  # transformers' numbers are still worth having
        record("tokenmill_error", f"{type(exc).__name__}: {exc}")
    del engine
    release_memory()
    model = hf_model(device)
    transformers_levels(model, work, vocab, deadline, record)
    del model
    release_memory()
