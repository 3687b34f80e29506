"""LoRA's cost: one adapted linear, then whole decode steps of SmolLM2-135M.

Layer: SmolLM2's 576 -> 1536 projection at rank 8, one thread, the base matmul alone against the base
plus the reference segmented matmul (`LoRAMethod`) and plus the CPU backend's `MaskedLoRA`, in float32
(F.linear) and bfloat16 (the CPU backend's packed bf16 kernel), alternating in one process.

Engine: the embedded SmolLM2-135M in bfloat16 on one thread, 16 sequences decoding: without adapters
(with the CPU backend's C decode step, then module by module as steps with adapter tokens run), with 4
rank-8 adapters loaded but every request on the base model, and with the 16 requests spread over the 4
adapters (the CPU method, its masked GEMMs alone, the reference).

    python -m benchmarks.micro.lora
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tokenmill.engine import Engine, EngineConfig
from tokenmill.interfaces import LoRABatch, LoRAMethod
from tokenmill.lora.batch import group_by_slot
from tokenmill.plugins.cpu import lora as cpu_lora
from tokenmill.plugins.cpu.quant import PackedBF16Linear, bf16_gemm_available
from tokenmill.sampling_params import SamplingParams

IN, OUT, RANK = 576, 1536, 8
# name -> token slots (0: the base model)
STEPS = {
    "decode 16 tok, 4 adapters": [1 + i % 4 for i in range(16)],
    "decode 16 tok, 2 adapters + 8 base": [(1 + i % 2) if i % 2 else 0 for i in range(16)],
    "decode 1 tok, 1 adapter": [1],
    "prefill 512 tok, 2 adapters": [1] * 256 + [2] * 256,
    "prefill 512 tok, 1 adapter + 256 base": [0] * 256 + [1] * 256,
}


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def layer(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(OUT, IN, generator=generator) * 0.02).to(dtype)
    a = (torch.randn(5, RANK, IN, generator=generator) * 0.1).to(dtype)
    b = (torch.randn(5, OUT, RANK, generator=generator) * 0.1).to(dtype)
    a[0], b[0] = 0, 0
    dense = PackedBF16Linear() if dtype == torch.bfloat16 and bf16_gemm_available() else None
    packed = dense.prepare(weight) if dense else None
    methods = {"reference": LoRAMethod(), "CPU method": cpu_lora.MaskedLoRA(dtype),
               "masked GEMMs": cpu_lora.MaskedLoRA(dtype)}
    methods["masked GEMMs"].kernel = False
    prepared = {label: method.prepare(a, b) for label, method in methods.items()}
    print(f"\n{dtype}: one {IN} -> {OUT} linear, rank {RANK}, median ms: the base matmul, then what LoRA adds "
          f"with {', '.join(methods)}")
    for name, slots in STEPS.items():
        x = torch.randn(len(slots), IN, generator=generator).to(dtype)
        packed_slots, segments = group_by_slot(np.array(slots), len(slots))
        sent = torch.from_numpy(packed_slots)
        batches = {label: LoRABatch(sent[: len(slots)], sent[len(slots):], segments) for label in methods}
        for label, method in methods.items():
            method.prepare_step(batches[label])

        def base():
            return dense.matmul(x, packed) if dense else F.linear(x, weight)

        runs = {"base": base}
        for label, method in methods.items():
            runs[label] = (lambda m=method, w=prepared[label], batch=batches[label]: m.apply(base(), x, w, batch))
        reps = 30 if len(slots) > 64 else 300
        results = {label: [] for label in runs}
        for _ in range(5):  # alternate, so load on the machine hits every variant alike
            for label, fn in runs.items():
                fn()
                results[label].append(_median_ms(fn, reps))
        medians = {label: statistics.median(values) for label, values in results.items()}
        added = "  ".join(f"+{medians[label] - medians['base']:6.3f}" for label in methods)
        print(f"  {name:40s} {medians['base']:7.3f}  {added}")


def _smollm2_adapters(engine: Engine, folder: Path, count: int) -> tuple[tuple[str, str], ...]:
    """Random rank-8 adapters over every projection of the engine's model, in PEFT's layout."""
    config = engine.model_config
    head_dim = config.hidden_size // config.num_attention_heads
    shapes = {"self_attn.q_proj": (config.hidden_size, config.num_attention_heads * head_dim),
              "self_attn.k_proj": (config.hidden_size, config.num_key_value_heads * head_dim),
              "self_attn.v_proj": (config.hidden_size, config.num_key_value_heads * head_dim),
              "self_attn.o_proj": (config.num_attention_heads * head_dim, config.hidden_size),
              "mlp.gate_proj": (config.hidden_size, config.intermediate_size),
              "mlp.up_proj": (config.hidden_size, config.intermediate_size),
              "mlp.down_proj": (config.intermediate_size, config.hidden_size)}
    specs = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        tensors = {}
        for layer_index in range(config.num_hidden_layers):
            for module, (fan_in, fan_out) in shapes.items():
                prefix = f"base_model.model.model.layers.{layer_index}.{module}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=generator) * 0.01
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, RANK, generator=generator) * 0.01
        path = folder / f"adapter{index}"
        path.mkdir()
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 16}))
        specs.append((f"adapter{index}", str(path)))
    return tuple(specs)


def _decode_ms(engine: Engine, adapters: list[str | None], steps: int = 20) -> float:
    rng = random.Random(0)
    for index, adapter in enumerate(adapters):
        prompt = [rng.randrange(100, 40_000) for _ in range(60)]
        engine.add_request(f"r{index}-{time.monotonic()}", prompt,
                           SamplingParams(max_new_tokens=steps + 10, ignore_eos=True), adapter)
    for _ in range(5):  # the prefill, then a few decodes
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    while engine.has_unfinished():
        engine.step()
    return 1000 * statistics.median(times)


def engine_steps() -> None:
    config = EngineConfig(dtype="bfloat16", kv_cache_bytes=64 << 20, progress=False)
    plain = Engine(config)
    with tempfile.TemporaryDirectory() as folder:
        specs = _smollm2_adapters(plain, Path(folder), 4)
        adapted = Engine(EngineConfig(dtype="bfloat16", kv_cache_bytes=64 << 20, progress=False,
                                      lora_adapters=specs))
    torch.set_num_threads(1)  # building an engine takes every core; one thread measures steadier on a shared machine
    names = [name for name, _ in specs]
    spread = [names[i % 4] for i in range(16)]
    print("\nSmolLM2-135M bf16, 16 sequences decoding, median ms per step")
    results: dict[str, list[float]] = {}
    for _ in range(3):
        for label, run in (("no adapters loaded", lambda: _decode_ms(plain, [None] * 16)),
                           ("4 adapters loaded, base requests", lambda: _decode_ms(adapted, [None] * 16)),
                           ("16 requests over 4 adapters, CPU method", lambda: _decode_ms(adapted, spread))):
            results.setdefault(label, []).append(run())
        captured, plain.runner.forward = plain.runner.forward, plain.model  # no C decode step: what LoRA steps run
        results.setdefault("no adapters loaded, module by module", []).append(_decode_ms(plain, [None] * 16))
        plain.runner.forward = captured
        limits = cpu_lora.MAX_KERNEL_TOKENS, cpu_lora.MAX_MASKED_COLUMNS
        cpu_lora.MAX_KERNEL_TOKENS = 0  # the masked GEMMs instead of the C kernel
        results.setdefault("16 requests over 4 adapters, masked GEMMs", []).append(_decode_ms(adapted, spread))
        cpu_lora.MAX_MASKED_COLUMNS = 0  # every layer through the reference segmented matmul
        results.setdefault("16 requests over 4 adapters, reference", []).append(_decode_ms(adapted, spread))
        cpu_lora.MAX_KERNEL_TOKENS, cpu_lora.MAX_MASKED_COLUMNS = limits
    for label, values in results.items():
        print(f"  {label:42s} {statistics.median(values):7.2f}")


def main() -> None:
    torch.set_num_threads(1)
    for dtype in (torch.float32, torch.bfloat16):
        layer(dtype)
    engine_steps()


if __name__ == "__main__":
    main()
