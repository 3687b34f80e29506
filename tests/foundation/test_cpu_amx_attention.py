"""Decode attention on AMX tiles (csrc/attention_kernels.h `attend_amx`) computes what the AVX512-BF16 kernel
computes: bf16 products summed in float32, a float32 softmax, each weight as two bf16.

The tiles sum a dot product's pairs in another order than `vdpbf16ps`, so an output may differ from the other
kernel's in its last bf16 bit, rarely; both stay within one bf16 rounding of attention in float64.
"""

from __future__ import annotations

import pytest
import torch

from tokenmill.plugins.cpu import _paged_attention
from tokenmill.plugins.cpu.kernels import paged_decode_attention

pytestmark = pytest.mark.skipif(not _paged_attention.amx(), reason="needs a CPU with AMX and a build for it")

# Context lengths around the tile kernel's steps (16 positions of scores, 32 of weighted sum) and long ones.
SEQ_LENS = [1, 5, 16, 17, 31, 32, 33, 100, 700]


@pytest.fixture
def attend():
    """Decode attention on the tiles or on AVX512-BF16; the tiles again afterwards."""

    def run(amx: bool, *args, **kwargs) -> torch.Tensor:
        _paged_attention.set_amx(amx)
        return paged_decode_attention(*args, **kwargs)

    yield run
    _paged_attention.set_amx(True)


def paged_case(seq_lens: list[int], kv_heads: int, group: int, block_size: int, head_dim: int = 64, seed: int = 0):
    """Random bf16 queries and caches, each sequence's blocks scattered over the cache."""
    generator = torch.Generator().manual_seed(seed)
    counts = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = 2 * sum(counts)
    keys = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=generator).to(torch.bfloat16)
    values = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=generator).to(torch.bfloat16)
    shuffled = torch.randperm(num_blocks, generator=generator).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(counts), dtype=torch.int32)
    taken = 0
    for seq, count in enumerate(counts):
        tables[seq, :count] = shuffled[taken:taken + count]
        taken += count
    query = torch.randn(len(seq_lens), kv_heads * group, head_dim, generator=generator).to(torch.bfloat16)
    return query, keys, values, tables, torch.tensor(seq_lens, dtype=torch.int32)


def float64_attention(query, keys, values, tables, seq_lens, block_size, window, scale) -> torch.Tensor:
    kv_heads, group, head_dim = keys.shape[1], query.shape[1] // keys.shape[1], keys.shape[-1]
    out = torch.empty(query.shape, dtype=torch.float64)
    for seq, length in enumerate(seq_lens.tolist()):
        blocks = tables[seq, :(length + block_size - 1) // block_size].long()
        first = max(0, length - window) if window else 0
        k = keys[blocks].transpose(0, 1).reshape(kv_heads, -1, head_dim)[:, first:length].double()
        v = values[blocks].transpose(0, 1).reshape(kv_heads, -1, head_dim)[:, first:length].double()
        for head in range(query.shape[1]):
            weights = torch.softmax(query[seq, head].double() @ k[head // group].T * scale, dim=-1)
            out[seq, head] = weights @ v[head // group]
    return out


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kv_heads,group", [(1, 1), (3, 3), (8, 4), (2, 7), (1, 16)], ids=str)
@pytest.mark.parametrize("block_size,window", [(16, None), (8, None), (32, None), (16, 50)], ids=str)
def test_the_tiles_agree_with_avx512_bf16_and_with_float64(attend, head_dim, kv_heads, group, block_size,
                                                           window) -> None:
    """Block sizes 8 and 32 and a sliding window put a 16-position chunk's keys off one block's run."""
    case = paged_case(SEQ_LENS, kv_heads, group, block_size, head_dim)
    scale = head_dim ** -0.5
    args = (*case, sum(SEQ_LENS), block_size, window, scale)
    tiles, avx512 = attend(True, *args), attend(False, *args)
    reference = float64_attention(*case, block_size, window, scale)
    # The output's bf16 rounding, give or take the float32 sums' and the weights' own error.
    torch.testing.assert_close(tiles.double(), reference, rtol=2 ** -7, atol=2e-3)
    assert (tiles != avx512).double().mean() < 0.01


def test_a_sequence_gets_the_same_result_alone_and_in_a_batch(attend) -> None:
    query, keys, values, tables, seq_lens = paged_case(SEQ_LENS, 3, 3, 16, seed=1)
    batched = attend(True, query, keys, values, tables, seq_lens, sum(SEQ_LENS), 16, None, 0.125)
    for seq, length in enumerate(SEQ_LENS):
        alone = attend(True, query[seq:seq + 1], keys, values, tables[seq:seq + 1], seq_lens[seq:seq + 1], length,
                       16, None, 0.125)
        assert torch.equal(alone, batched[seq:seq + 1]), f"sequence {seq} ({length} positions)"


@pytest.mark.parametrize("head_dim", [64, 128])
def test_every_value_row_and_dim_counts(attend, head_dim) -> None:
    """A value made large moves its sequence's output in its dim, wherever it falls in a 32-position step
    and in the 64 dims of a pass."""
    query, keys, values, tables, seq_lens = paged_case([70], 1, 4, 16, head_dim, seed=2)
    base = attend(True, query, keys, values, tables, seq_lens, 70, 16, None, 0.125)
    for position, dim in [(0, 0), (15, 17), (31, 40), (32, 63), (63, head_dim - 1), (64, head_dim // 2 + 5), (69, 9)]:
        changed = values.clone()
        block, offset = int(tables[0, position // 16]), position % 16
        changed[block, 0, offset, dim] += 100
        moved = attend(True, query, keys, changed, tables, seq_lens, 70, 16, None, 0.125)
        assert not torch.equal(moved[..., dim], base[..., dim]), f"position {position}, dim {dim}"


def prompt_rows(case, lengths: list[int]):
    """Each sequence's last `lengths[s]` positions as rows of their own, as attention.py's `row_contexts` feeds a
    prompt (or a draft) to the kernel: the sequence's block table again per row, one more position per row."""
    query, keys, values, tables, seq_lens = case
    generator = torch.Generator().manual_seed(7)
    rows = [(seq, int(seq_lens[seq]) - length + r + 1) for seq, length in enumerate(lengths) for r in range(length)]
    row_query = torch.randn(len(rows), query.shape[1], query.shape[2], generator=generator).to(torch.bfloat16)
    row_tables = torch.stack([tables[seq] for seq, _ in rows])
    return row_query, keys, values, row_tables, torch.tensor([n for _, n in rows], dtype=torch.int32)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kv_heads,group", [(1, 1), (3, 3), (8, 4), (2, 7), (1, 16)], ids=str)
@pytest.mark.parametrize("block_size,window", [(16, None), (8, None), (32, None), (16, 40)], ids=str)
def test_a_prompts_rows_taken_together_equal_each_row_alone(attend, head_dim, kv_heads, group, block_size,
                                                             window) -> None:
    """Consecutive rows of one sequence share a pass on the tiles (up to 16 query heads); each row's output is
    still bit for bit the one-token decode at its position, which the test above holds to float64. Prompts of
    1 to 40 rows, a decode between them, and two sequences whose rows continue one another's lengths."""
    seq_lens = [45, 46, 47, 9, 80]
    case = paged_case(seq_lens, kv_heads, group, block_size, head_dim, seed=3)
    rows = prompt_rows(case, [40, 1, 1, 9, 17])
    query, keys, values, tables, lens = rows
    batched = attend(True, *rows, int(lens.sum()), block_size, window, head_dim ** -0.5)
    for row in range(len(lens)):
        alone = attend(True, query[row:row + 1], keys, values, tables[row:row + 1], lens[row:row + 1],
                       int(lens[row]), block_size, window, head_dim ** -0.5)
        assert torch.equal(alone, batched[row:row + 1]), f"row {row} (context {int(lens[row])})"
    reference = float64_attention(*rows, block_size, window, head_dim ** -0.5)
    torch.testing.assert_close(batched.double(), reference, rtol=2 ** -7, atol=2e-3)
