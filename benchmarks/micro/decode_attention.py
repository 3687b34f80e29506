"""Decode attention over cold caches: the paged kernel over 30 layers' caches (none in L3 when read),
against a streaming read of the same tensors, in GB/s.

    python -m benchmarks.micro.decode_attention
"""

from __future__ import annotations

import time

import torch

from tokenmill.plugins.cpu.kernels import paged_decode_attention

NUM_SEQS, KV_HEADS, GROUP, HEAD_DIM, BLOCK_SIZE, NUM_LAYERS = 64, 3, 3, 64, 16, 30


def main() -> None:
    torch.manual_seed(0)
    seq_lens = torch.tensor([730 if i % 4 == 3 else 90 for i in range(NUM_SEQS)], dtype=torch.int32)
    blocks_per_seq = (seq_lens + BLOCK_SIZE - 1) // BLOCK_SIZE
    num_blocks = 2 * int(blocks_per_seq.sum())
    caches = [torch.randn(2, num_blocks, KV_HEADS, BLOCK_SIZE, HEAD_DIM, dtype=torch.bfloat16)
              for _ in range(NUM_LAYERS)]
    shuffled = torch.randperm(num_blocks).to(torch.int32)
    block_tables = torch.zeros(NUM_SEQS, int(blocks_per_seq.max()), dtype=torch.int32)
    taken = 0
    for seq, count in enumerate(blocks_per_seq.tolist()):
        block_tables[seq, :count] = shuffled[taken : taken + count]
        taken += count
    query = torch.randn(NUM_SEQS, KV_HEADS * GROUP, HEAD_DIM, dtype=torch.bfloat16)
    total = int(seq_lens.sum())
    read_gb = total * KV_HEADS * HEAD_DIM * 2 * 2 * NUM_LAYERS / 1e9
    for _ in range(3):
        start = time.perf_counter()
        for cache in caches:
            paged_decode_attention(query, cache[0], cache[1], block_tables, seq_lens, total, BLOCK_SIZE, None, 0.125)
        kernel = time.perf_counter() - start
        start = time.perf_counter()
        for cache in caches:
            cache.sum()
        streaming = time.perf_counter() - start
        cache_gb = sum(c.numel() * c.element_size() for c in caches) / 1e9
        print(f"kernel {1000 * kernel:.1f} ms ({read_gb / kernel:.1f} GB/s); "
              f"streaming sum {cache_gb / streaming:.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
