"""Decode attention over cold caches: the paged kernel over every layer's caches (none in L3 when read),
against a streaming read of the same tensors, in GB/s, for the kv-head shapes of a few common models.
Where the CPU has AMX, its tiles against the AVX512-BF16 kernel, alternating in one process.

    python -m benchmarks.micro.decode_attention
"""

from __future__ import annotations

import statistics
import time

import torch

from tokenmill.plugins.cpu import _paged_attention
from tokenmill.plugins.cpu.kernels import paged_decode_attention

NUM_SEQS, BLOCK_SIZE, ROUNDS = 64, 16, 4
# name: (kv heads, query heads per kv head, head size, layers); 32 sequences for the 8B, whose caches are large.
SHAPES = {
    "SmolLM2-135M": (3, 3, 64, 30),
    "Llama-3.2-1B": (8, 4, 64, 16),
    "Qwen2.5-0.5B": (2, 7, 64, 24),
    "Llama-3-8B (32 seqs, 8 layers)": (8, 4, 128, 8),
}


def measure(name: str, kv_heads: int, group: int, head_dim: int, num_layers: int) -> None:
    torch.manual_seed(0)
    num_seqs = 32 if head_dim == 128 else NUM_SEQS
    seq_lens = torch.tensor([730 if i % 4 == 3 else 90 for i in range(num_seqs)], dtype=torch.int32)
    blocks_per_seq = (seq_lens + BLOCK_SIZE - 1) // BLOCK_SIZE
    num_blocks = 2 * int(blocks_per_seq.sum())
    caches = [torch.randn(2, num_blocks, kv_heads, BLOCK_SIZE, head_dim, dtype=torch.bfloat16)
              for _ in range(num_layers)]
    shuffled = torch.randperm(num_blocks).to(torch.int32)
    block_tables = torch.zeros(num_seqs, int(blocks_per_seq.max()), dtype=torch.int32)
    taken = 0
    for seq, count in enumerate(blocks_per_seq.tolist()):
        block_tables[seq, :count] = shuffled[taken : taken + count]
        taken += count
    query = torch.randn(num_seqs, kv_heads * group, head_dim, dtype=torch.bfloat16)
    total = int(seq_lens.sum())
    read_gb = total * kv_heads * head_dim * 2 * 2 * num_layers / 1e9
    kernels = {"amx": True, "avx512-bf16": False} if _paged_attention.amx() else {"avx512-bf16": False}
    times: dict[str, list[float]] = {kernel: [] for kernel in kernels}
    streaming = []
    for _ in range(ROUNDS):
        for kernel, amx in kernels.items():
            _paged_attention.set_amx(amx)
            start = time.perf_counter()
            for cache in caches:
                paged_decode_attention(query, cache[0], cache[1], block_tables, seq_lens, total, BLOCK_SIZE, None,
                                       head_dim ** -0.5)
            times[kernel].append(time.perf_counter() - start)
        start = time.perf_counter()
        for cache in caches:
            cache.sum()
        streaming.append(time.perf_counter() - start)
    _paged_attention.set_amx(True)
    cache_gb = sum(c.numel() * c.element_size() for c in caches) / 1e9
    medians = {kernel: statistics.median(values) for kernel, values in times.items()}
    parts = ", ".join(f"{kernel} {1000 * t:.1f} ms ({read_gb / t:.1f} GB/s)" for kernel, t in medians.items())
    ratio = f"; avx512-bf16 / amx {medians['avx512-bf16'] / medians['amx']:.2f}x" if "amx" in medians else ""
    print(f"{name}: {parts}{ratio}; streaming sum {cache_gb / statistics.median(streaming):.1f} GB/s", flush=True)


def main() -> None:
    for name, shape in SHAPES.items():
        measure(name, *shape)


if __name__ == "__main__":
    main()
