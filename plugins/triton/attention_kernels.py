"""Paged-attention kernels over the cache layout ``(2, num_blocks, num_kv_heads, block_size, head_dim)``.

Three kernels: the cache write at `slot_mapping`, a ragged kernel for any mix of prefills, prefill
chunks over cached tokens and decodes, and a decode kernel whose grid depends on the number of
sequences only, so a captured CUDA graph replays it for any context lengths.

Conventions shared by the attention kernels:
* Query row r of a sequence with q_len new tokens and seq_len tokens of context sits at position
  ``seq_len - q_len + r``; it sees keys at positions <= its own, and with a window W only those
  > ``position - W`` (itself included, W keys at most).
* `HEAD_DIM_PADDED` is the power of two `tl.arange` needs; lanes past `HEAD_DIM` load as zeros, which
  leave q·k unchanged, and are never stored.
* Every kernel is self-contained (no `@triton.jit` helpers): `aot.py` recompiles them from a process
  that runs the interpreter, where a helper would be an interpreted function the compiler rejects.
* `DOT_F32` is the interpreter's bf16 `tl.dot` work-around (Triton 3.9 returns garbage); it is False on
  hardware. ``input_precision="ieee"`` keeps float32 models off TF32, which would miss their tolerance.
* Softmax runs online in float32; `tanh` is written through `sigmoid` because Triton has no portable tanh.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def write_kv_cache_kernel(
    key_ptr, value_ptr, cache_ptr, slot_mapping_ptr,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_c_kv, stride_c_blk, stride_c_head, stride_c_tok,
    NUM_KV_HEADS: tl.constexpr, KV_HEADS_PADDED: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """One program per token writes its keys and values of every kv head at its slot."""
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:  # a padding token: it owns no slot
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, KV_HEADS_PADDED)[:, None]
    d = tl.arange(0, HEAD_DIM_PADDED)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(key_ptr + token * stride_k_tok + h * stride_k_head + d, mask=mask)
    v = tl.load(value_ptr + token * stride_v_tok + h * stride_v_head + d, mask=mask)
    dst = block * stride_c_blk + h * stride_c_head + offset * stride_c_tok + d
    tl.store(cache_ptr + dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(cache_ptr + stride_c_kv + dst, v.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ragged_paged_attention_kernel(
    out_ptr, query_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale, softcap, window,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_c_kv, stride_c_blk, stride_c_head, stride_c_tok, stride_bt_seq,
    QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Grid (num_seqs, num_heads, cdiv(max_query_len, BLOCK_M)): BLOCK_M query rows of one head."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:  # the grid is sized for the longest query of the step
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < q_len
    q_pos = context + rows
    d = tl.arange(0, HEAD_DIM_PADDED)
    d_valid = d < HEAD_DIM
    t = tl.arange(0, BLOCK_SIZE)
    q = tl.load(query_ptr + (q_start + rows)[:, None] * stride_q_tok + head * stride_q_head + d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], tl.float32)
    kv_base = (head // QUERIES_PER_KV) * stride_c_head
    last_pos = context + tl.minimum(tile * BLOCK_M + BLOCK_M, q_len) - 1  # the tile's causal bound
    first_block = 0
    if USE_WINDOW:
        first_block = tl.maximum(context + tile * BLOCK_M - window + 1, 0) // BLOCK_SIZE
    for i in range(first_block, last_pos // BLOCK_SIZE + 1):
        block = tl.load(block_tables_ptr + seq * stride_bt_seq + i).to(tl.int64)
        k_pos = i * BLOCK_SIZE + t
        offsets = block * stride_c_blk + kv_base + t[:, None] * stride_c_tok + d[None, :]
        kv_mask = (k_pos < seq_len)[:, None] & d_valid[None, :]
        k = tl.load(cache_ptr + offsets, mask=kv_mask, other=0.0)
        v = tl.load(cache_ptr + stride_c_kv + offsets, mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        if USE_SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
        allowed = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < seq_len)
        if USE_WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    out = acc / tl.where(row_valid, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_o_tok + head * stride_o_head + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


@triton.jit
def paged_decode_kernel(
    out_ptr, query_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr,
    scale, softcap, window,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_c_kv, stride_c_blk, stride_c_head, stride_c_tok, stride_bt_seq,
    QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Grid (num_seqs, num_kv_heads); sequence i's one query token is token i.

    The rows are the kv head's QUERIES_PER_KV query heads (padded to BLOCK_M >= 16 for `tl.dot`), so
    each key block is read once per kv head. A sequence of length 0 (padding up to a captured batch
    size) writes zeros and returns, leaving no NaN for later layers to spread.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    group = tl.arange(0, BLOCK_M)
    row_valid = group < QUERIES_PER_KV
    head = kv_head * QUERIES_PER_KV + group
    d = tl.arange(0, HEAD_DIM_PADDED)
    d_valid = d < HEAD_DIM
    io_mask = row_valid[:, None] & d_valid[None, :]
    out_ptrs = out_ptr + seq * stride_o_tok + head[:, None] * stride_o_head + d[None, :]
    if seq_len <= 0:
        tl.store(out_ptrs, tl.zeros([BLOCK_M, HEAD_DIM_PADDED], out_ptr.dtype.element_ty), mask=io_mask)
        return
    q = tl.load(query_ptr + seq * stride_q_tok + head[:, None] * stride_q_head + d[None, :], mask=io_mask,
                other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    t = tl.arange(0, BLOCK_SIZE)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], tl.float32)
    kv_base = kv_head * stride_c_head
    first_block = 0
    if USE_WINDOW:
        first_block = tl.maximum(seq_len - window, 0) // BLOCK_SIZE
    for i in range(first_block, tl.cdiv(seq_len, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + seq * stride_bt_seq + i).to(tl.int64)
        k_pos = i * BLOCK_SIZE + t
        offsets = block * stride_c_blk + kv_base + t[:, None] * stride_c_tok + d[None, :]
        kv_mask = (k_pos < seq_len)[:, None] & d_valid[None, :]
        k = tl.load(cache_ptr + offsets, mask=kv_mask, other=0.0)
        v = tl.load(cache_ptr + stride_c_kv + offsets, mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        if USE_SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
        allowed = k_pos < seq_len  # the query is the context's last token: causality is this bound
        if USE_WINDOW:
            allowed = allowed & (k_pos >= seq_len - window)
        s = tl.where(allowed[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])  # every block holds an allowed key, so m_new is finite
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    tl.store(out_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=io_mask)
