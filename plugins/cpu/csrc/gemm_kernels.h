/*
 * Kernels of bf16 linear layers for the CPU backend: y = x @ W^T on AVX512-BF16, W either dense bf16 or the GGUF
 * checkpoint's own Q4_1 blocks.
 *
 * Dense layout: W (N, K) becomes (N_pad / 16, K_pad / 2, 16, 2): for each panel of 16 output features,
 * consecutive pairs of input features, so one 512-bit load holds 16 outputs x 2 inputs and one
 * `vdpbf16ps` against a broadcast pair of x adds both products into 16 float32 accumulators. Each
 * weight load serves a tile of up to 8 rows of x, weights are read once per tile of rows from L1/L2,
 * and output features are spread over PyTorch's OpenMP threads (the extension links the same libgomp).
 * Accumulation is float32, rounded to bf16 once at the end, as oneDNN's bf16 GEMM does.
 *
 * Q4_1 layout (packed by `pack_ggml_rows` below): per panel of 16 outputs and block of 32 inputs, 320 bytes:
 * the 16 fp16 scales d, the 16 fp16 minimums m, then 4 chunks of 32 16-bit words whose nibble s holds
 * the q of input pair 4c + s, laid out as one dense 16 x 2 vector. A shift and one logic op make the
 * words 0x4300 | q, the exact bf16 of 128 + q; per block, vdpbf16ps sums S = sum (128 + q) x, and the
 * output gains d S + (m - 128 d) sum(x) in float32. That is the exact value of the dequantized weight
 * d q + m times x, without rounding the weight to bf16 first (so it is closer to the float32 reference
 * than the dense kernel), from 0.625 bytes per weight instead of 2. The two per-block multiply-adds
 * cost more than the bytes saved once rows are many: quant.py switches to the dense form there.
 *
 * Q8_0 layout: 32 bytes of fp16 d, then per input pair 32 int8 in the dense 16 x 2 order; each pair
 * becomes exact bf16 integers through float, and the output gains d S per block.
 */
#ifndef TOKENMILL_GEMM_KERNELS_H
#define TOKENMILL_GEMM_KERNELS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "cpu_math.h"
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define HAVE_AVX512_GEMM 1
#else
#define HAVE_AVX512_GEMM 0
#endif
/* Without AVX-512, the dense format and GGUF's Q4_1 and Q8_0 blocks on AVX2 (avx2_gemm.h); grouped codes not. A CPU with
 * AVX-512 but not AVX512-BF16 (Skylake-X to Ice Lake) keeps float32 by default and oneDNN for bf16: MKL's
 * 512-bit float32 GEMM there was not measured against these 256-bit panels. */
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HAVE_AVX2_GEMM 1
#else
#define HAVE_AVX2_GEMM 0
#endif
#define HAVE_BF16_GEMM (HAVE_AVX512_GEMM || HAVE_AVX2_GEMM)
#if HAVE_BF16_GEMM
#include <immintrin.h>
#endif

#define ROWS_PER_TILE 8 /* rows of x sharing each weight load (4 and 12 measured slower) */
#define PANELS_PER_BLOCK 2 /* 16-feature panels per work item: 32 output features */
#define GGML_BLOCK 32 /* inputs per Q4_1 or Q8_0 block */
#define Q4_BLOCK_BYTES 320 /* one panel's block: 32 bytes of d, 32 of m, 4 chunks of 64 bytes of nibbles */
#define Q8_BLOCK_BYTES 544 /* one panel's block: 32 bytes of d, 16 pairs x 32 int8 */
#define GGML_MAX_PANELS 4 /* panels per work item at one or two rows */
/* Below this many multiply-adds, waking a second thread costs more than it saves. */
#define GEMM_PARALLEL_THRESHOLD 200000
/* From this many rows, work items are handed out one at a time (OpenMP's dynamic schedule): when the OS
 * preempts one compute thread (for the router, a client, a neighbour), the other takes its remaining items
 * instead of waiting for it at the barrier. Below, a thread's items stay one contiguous half, as a static
 * schedule gives: a row or two is bound by reading the weights, in order, and an item's outputs then share
 * cache lines with the next item's. Either way each item writes its own outputs: the same result bit for bit. */
#define DYNAMIC_MIN_ROWS 8

/* The chunk for `schedule(dynamic, items_per_take)` over `items` work items of `rows` rows each. */
static inline long work_chunk(long rows, long items, int workers) {
    const long half = (items + workers - 1) / workers;
    return rows >= DYNAMIC_MIN_ROWS || half < 1 ? 1 : half;
}

/* GROUPED: grouped_kernels.h. Q4_1_INT8, Q8_0_INT8: the same blocks, from INT8_MIN_ROWS rows against int8
 * activations (below, where the build has AVX512-VNNI). Q4_1_TILES, Q8_0_TILES: the same blocks dequantized
 * to bf16 onto AMX tiles at every row count (amx_gemm.h; only where `amx_usable`). */
enum { GEMM_DENSE = 0, GEMM_Q4_1 = 1, GEMM_Q8_0 = 2, GEMM_GROUPED = 3, GEMM_Q4_1_INT8 = 4, GEMM_Q8_0_INT8 = 5,
       GEMM_Q4_1_TILES = 6, GEMM_Q8_0_TILES = 7 };

#if HAVE_BF16_GEMM
typedef struct {
    const uint16_t *x;
    const void *w;
    uint16_t *y;
    long m, n, k_pairs, x_stride, y_stride;
} Gemm;

static inline long num_panels(const Gemm *g) { return g->n / 16 + (g->n % 16 != 0); }
#endif

#if HAVE_AVX512_GEMM
/* How far ahead the AVX512 kernels ask for their weights (software prefetch into L1), as amx_gemm.h's do:
 * measured on SmolLM2's decode steps, 4 streams 10.3 -> 9.45 ms, one 4.0 -> 3.9; without AMX, 16 streams
 * 32.9 -> 30.5 ms. */
#define DENSE_PREFETCH_PAIRS 16
#define GGML_PREFETCH_BLOCKS 2

/* Rows m0 .. m0+MT-1 of output panel v (features 16v .. 16v+15) from float32 accumulators. */
static inline __attribute__((always_inline)) void store_panel(const Gemm *g, const __m512 *acc, long v, long m0,
                                                              const int MT) {
    const long left = g->n - v * 16;
    if (left <= 0) return;
    const __mmask16 mask = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
    for (int r = 0; r < MT; r++)
        _mm256_mask_storeu_epi16(g->y + (m0 + r) * g->y_stride + v * 16, mask, (__m256i)_mm512_cvtneps_pbh(acc[r]));
}

/* Rows m0 .. m0+MT-1 against two dense packed panels w0, w1 (w1 == w0 when there is one). */
static inline __attribute__((always_inline)) void dense_tile(const Gemm *g, const uint16_t *w0, const uint16_t *w1,
                                                             long v0, int nv, long m0, const int MT) {
    __m512 acc0[ROWS_PER_TILE], acc1[ROWS_PER_TILE];
    for (int r = 0; r < MT; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    const int32_t *x_pairs[ROWS_PER_TILE];
    for (int r = 0; r < MT; r++) x_pairs[r] = (const int32_t *)(g->x + (m0 + r) * g->x_stride);
    for (long p = 0; p < g->k_pairs; p++) {
        _mm_prefetch((const char *)(w0 + (p + DENSE_PREFETCH_PAIRS) * 32), _MM_HINT_T0); /* never faults */
        _mm_prefetch((const char *)(w1 + (p + DENSE_PREFETCH_PAIRS) * 32), _MM_HINT_T0);
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(w0 + p * 32);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(w1 + p * 32);
        for (int r = 0; r < MT; r++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32(x_pairs[r][p]);
            acc0[r] = _mm512_dpbf16_ps(acc0[r], b0, a);
            acc1[r] = _mm512_dpbf16_ps(acc1[r], b1, a);
        }
    }
    store_panel(g, acc0, v0, m0, MT);
    if (nv > 1) store_panel(g, acc1, v0 + 1, m0, MT);
}

/* Every row of x against dense panels w0, w1, in tiles of ROWS_PER_TILE rows. */
static void dense_rows(const Gemm *g, const uint16_t *w0, const uint16_t *w1, long v0, int nv) {
    long m0 = 0;
    for (; m0 + ROWS_PER_TILE <= g->m; m0 += ROWS_PER_TILE) dense_tile(g, w0, w1, v0, nv, m0, ROWS_PER_TILE);
    switch (g->m - m0) {
#define TAIL(t) case t: dense_tile(g, w0, w1, v0, nv, m0, t); break;
        TAIL(1) TAIL(2) TAIL(3) TAIL(4) TAIL(5) TAIL(6) TAIL(7)
#undef TAIL
        default: break;
    }
}

static void dense_block(const Gemm *g, long block) {
    const long v0 = block * PANELS_PER_BLOCK, panels = num_panels(g);
    const int nv = panels - v0 < PANELS_PER_BLOCK ? (int)(panels - v0) : PANELS_PER_BLOCK;
    const uint16_t *w0 = (const uint16_t *)g->w + v0 * g->k_pairs * 32;
    dense_rows(g, w0, nv > 1 ? w0 + g->k_pairs * 32 : w0, v0, nv);
}

/* ---- Q4_1 ---------------------------------------------------------------------------------------- */

/* 128 + q (q a nibble) is exactly the bf16 bit pattern 0x4300 | q: one logic op turns 32 nibbles of a
 * chunk, shifted to the bottom of each 16-bit word, into 32 exact bf16 weights. */
static inline __attribute__((always_inline)) __m512bh q4_nibbles(__m512i chunk, const int shift) {
    const __m512i v = shift ? _mm512_srli_epi16(chunk, shift) : chunk;
    return (__m512bh)_mm512_ternarylogic_epi32(v, _mm512_set1_epi16(0x000F), _mm512_set1_epi16(0x4300), 0xEA);
}

/* One input pair of a Q8_0 panel's block (16 outputs x 2 inputs of int8) as exact bf16 weights. */
static inline __attribute__((always_inline)) __m512bh q8_pair(const int8_t *q) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16))));
    return _mm512_cvtne2ps_pbh(hi, lo);
}

/* Rows m0 .. m0+MT-1 against NP panels of ggml blocks from panel v0 (those past the last are computed
 * from the last and not stored). Per block of 32 inputs, vdpbf16ps sums S = sum w x over exact bf16
 * integers w, then float32 scales it in: Q4_1 (w = 128 + q) y += d S + (m - 128 d) sum(x), the exact
 * sum of (d q + m) x; Q8_0 (w = q) y += d S. Each output's arithmetic is the same whatever NP and MT
 * are, so a row's result does not depend on the batch it runs in; NP only sets how many independent
 * chains of vdpbf16ps hide its latency when rows are few. */
static inline __attribute__((always_inline)) void ggml_tile(const Gemm *g, const float *x_sums, long v0, long m0,
                                                            const int MT, const int NP, const int FORMAT) {
    const long blocks = g->k_pairs * 2 / GGML_BLOCK, panels = num_panels(g);
    const long block_bytes = FORMAT == GEMM_Q4_1 ? Q4_BLOCK_BYTES : Q8_BLOCK_BYTES;
    const uint8_t *panel[GGML_MAX_PANELS];
    for (int j = 0; j < NP; j++)
        panel[j] = (const uint8_t *)g->w + (v0 + j < panels ? v0 + j : panels - 1) * blocks * block_bytes;
    const int32_t *x_pairs[ROWS_PER_TILE];
    for (int r = 0; r < MT; r++) x_pairs[r] = (const int32_t *)(g->x + (m0 + r) * g->x_stride);
    __m512 acc[GGML_MAX_PANELS][ROWS_PER_TILE];
    for (int j = 0; j < NP; j++)
        for (int r = 0; r < MT; r++) acc[j][r] = _mm512_setzero_ps();
    for (long b = 0; b < blocks; b++) {
        __m512 sums[GGML_MAX_PANELS][ROWS_PER_TILE];
        for (int j = 0; j < NP; j++)
            for (long l = 0; l < block_bytes; l += 64)
                _mm_prefetch((const char *)(panel[j] + (b + GGML_PREFETCH_BLOCKS) * block_bytes + l), _MM_HINT_T0);
        for (int j = 0; j < NP; j++)
            for (int r = 0; r < MT; r++) sums[j][r] = _mm512_setzero_ps();
        if (FORMAT == GEMM_Q4_1) {
            for (int c = 0; c < 4; c++) {
                const long pair = b * (GGML_BLOCK / 2) + c * 4; /* chunk c holds pairs 4c .. 4c+3 */
                __m512i chunk[GGML_MAX_PANELS];
                for (int j = 0; j < NP; j++) chunk[j] = _mm512_loadu_si512(panel[j] + b * block_bytes + 64 + c * 64);
                for (int sh = 0; sh < 4; sh++)
                    for (int j = 0; j < NP; j++) {
                        const __m512bh w = q4_nibbles(chunk[j], 4 * sh);
                        for (int r = 0; r < MT; r++)
                            sums[j][r] = _mm512_dpbf16_ps(sums[j][r], w,
                                                          (__m512bh)_mm512_set1_epi32(x_pairs[r][pair + sh]));
                    }
            }
        } else {
            for (int p = 0; p < GGML_BLOCK / 2; p++)
                for (int j = 0; j < NP; j++) {
                    const __m512bh w = q8_pair((const int8_t *)(panel[j] + b * block_bytes + 32 + p * 32));
                    for (int r = 0; r < MT; r++)
                        sums[j][r] = _mm512_dpbf16_ps(sums[j][r], w,
                                                      (__m512bh)_mm512_set1_epi32(x_pairs[r][b * (GGML_BLOCK / 2) + p]));
                }
        }
        for (int j = 0; j < NP; j++) {
            const uint8_t *block = panel[j] + b * block_bytes;
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)block));
            if (FORMAT == GEMM_Q4_1) {
                const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + 32)));
                const __m512 min = _mm512_fnmadd_ps(_mm512_set1_ps(128.f), d, m);
                for (int r = 0; r < MT; r++)
                    acc[j][r] = _mm512_fmadd_ps(min, _mm512_set1_ps(x_sums[(m0 + r) * blocks + b]),
                                                _mm512_fmadd_ps(d, sums[j][r], acc[j][r]));
            } else {
                for (int r = 0; r < MT; r++) acc[j][r] = _mm512_fmadd_ps(d, sums[j][r], acc[j][r]);
            }
        }
    }
    for (int j = 0; j < NP; j++) store_panel(g, acc[j], v0 + j, m0, MT);
}

/* Work item `item` of a ggml format: NP panels against every row, in tiles of ROWS_PER_TILE rows. */
static inline __attribute__((always_inline)) void ggml_item(const Gemm *g, const float *x_sums, long item,
                                                            const int NP, const int FORMAT) {
    const long v0 = item * NP;
    long m0 = 0;
    for (; m0 + ROWS_PER_TILE <= g->m; m0 += ROWS_PER_TILE) ggml_tile(g, x_sums, v0, m0, ROWS_PER_TILE, NP, FORMAT);
    switch (g->m - m0) {
#define TAIL(t) case t: ggml_tile(g, x_sums, v0, m0, t, NP, FORMAT); break;
        TAIL(1) TAIL(2) TAIL(3) TAIL(4) TAIL(5) TAIL(6) TAIL(7)
#undef TAIL
        default: break;
    }
}

/* Panels per ggml work item: 4 at one or two rows (more chains in flight), else 2. */
static inline int ggml_panels_per_item(long m) { return m <= 2 ? GGML_MAX_PANELS : 2; }

static void ggml_run(const Gemm *g, const float *x_sums, long item, int format) {
    const int wide = ggml_panels_per_item(g->m) == GGML_MAX_PANELS;
    if (format == GEMM_Q4_1) {
        if (wide) ggml_item(g, x_sums, item, GGML_MAX_PANELS, GEMM_Q4_1);
        else ggml_item(g, x_sums, item, 2, GEMM_Q4_1);
    } else {
        if (wide) ggml_item(g, x_sums, item, GGML_MAX_PANELS, GEMM_Q8_0);
        else ggml_item(g, x_sums, item, 2, GEMM_Q8_0);
    }
}

/* sum(x) over each row's blocks of 32 inputs, (m, blocks) float32. */
static void block_sums(const Gemm *g, float *x_sums) {
    const long blocks = g->k_pairs * 2 / GGML_BLOCK;
    for (long r = 0; r < g->m; r++)
        for (long b = 0; b < blocks; b++) {
            const __m512i raw = _mm512_loadu_si512(g->x + r * g->x_stride + b * GGML_BLOCK);
            const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
            const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32((int)0xFFFF0000)));
            x_sums[r * blocks + b] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
        }
}
#endif


/* ---- int8 activations against the ggml blocks (AVX512-VNNI), for many rows ------------------------
 *
 * Asked for with the GEMM_*_INT8 formats (the CPU plugin's `--quantize int8-activations`). From
 * INT8_MIN_ROWS rows the blocks' float32 path above costs more than its bytes save, and vdpbf16ps on a
 * dense copy peaks at 32 multiply-adds an instruction; vpdpbusd (u8 x s8 into int32) does 64, at the same
 * rate on the CPUs measured (benchmarks/NOTES.md section 23). So the activations are quantized as
 * llama.cpp quantizes them for its Q4_1 and Q8_0 dot products: per row and block of 32 inputs,
 * d_x = max|x| / 127 and q_x = round(x / d_x). Per block the integer sum S = sum q_w q_x is exact and the
 * output gains d_w d_x S, Q4_1 also m sum(x) with the exact float32 sum of x. The packed blocks are read in
 * place, no other copy:
 * - Q4_1: a chunk's bytes masked to their low (high) nibbles hold, per output, the q of inputs 0, 4, 1, 5
 *   (2, 6, 3, 7) of its 8 (pairs 4c .. 4c+3, as pack_ggml_rows lays them out); the quantized activations
 *   are stored in that order, so one broadcast 32-bit word of them meets each 4 nibbles.
 * - Q8_0: two pairs' 64 bytes, their 16-bit words interleaved, hold per output 4 consecutive inputs. The
 *   unsigned operand is the activations, stored as q_x + 128, and S = sum (q_x + 128) q_w - 128 sum q_w,
 *   the block's sum of q_w by vpdpbusd against ones.
 * Each output's arithmetic is the same whatever the tile, so a row's result does not depend on its batch
 * beyond the choice of this path by row count.
 */
#if HAVE_AVX512_GEMM && defined(__AVX512VNNI__)
#define HAVE_INT8_GEMM 1
#define INT8_ROWS_PER_TILE 4
#define INT8_MIN_ROWS 8 /* below this, the float32 block path above (benchmarks/NOTES.md section 23) */

/* Per row and block of 32 inputs: the codes (in `format`'s order, see above) and d_x. */
static void quantize_activations(const Gemm *g, int format, uint8_t *codes, float *scales) {
    const long k = g->k_pairs * 2, blocks = k / GGML_BLOCK;
    const __m128i nibble_order = _mm_setr_epi8(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
    const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
    for (long r = 0; r < g->m; r++)
        for (long b = 0; b < blocks; b++) {
            const uint16_t *x = g->x + r * g->x_stride + b * GGML_BLOCK;
            const __m512 lo = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x)), 16));
            const __m512 hi = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + 16))), 16));
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(lo, magnitude),
                                                                  _mm512_and_ps(hi, magnitude)));
            const __m512 inverse = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            __m128i q[2] = {_mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse))),
                            _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse)))};
            for (int h = 0; h < 2; h++) {
                q[h] = format == GEMM_Q4_1 ? _mm_shuffle_epi8(q[h], nibble_order)
                                           : _mm_xor_si128(q[h], _mm_set1_epi8((char)0x80));
                _mm_storeu_si128((__m128i *)(codes + r * k + b * GGML_BLOCK + 16 * h), q[h]);
            }
            scales[r * blocks + b] = amax / 127.f;
        }
}

/* Rows m0 .. m0+MT-1 against panels v0, v0+1 (the second computed from the first and not stored when past the
 * last) of Q4_1 or Q8_0 blocks, from the quantized activations. */
static inline __attribute__((always_inline)) void int8_tile(const Gemm *g, const uint8_t *codes,
                                                            const float *scales, const float *x_sums, long v0,
                                                            long m0, const int MT, const int FORMAT) {
    const long k = g->k_pairs * 2, blocks = k / GGML_BLOCK, panels = num_panels(g);
    const long block_bytes = FORMAT == GEMM_Q4_1 ? Q4_BLOCK_BYTES : Q8_BLOCK_BYTES;
    const uint8_t *panel[2];
    for (int j = 0; j < 2; j++)
        panel[j] = (const uint8_t *)g->w + (v0 + j < panels ? v0 + j : panels - 1) * blocks * block_bytes;
    const __m512i nibble = _mm512_set1_epi8(0x0F), ones = _mm512_set1_epi8(1);
    /* Q8_0: word j of the first pair and word j of the second become 32-bit lane j. */
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __m512 acc[2][INT8_ROWS_PER_TILE];
    for (int j = 0; j < 2; j++)
        for (int r = 0; r < MT; r++) acc[j][r] = _mm512_setzero_ps();
    for (long b = 0; b < blocks; b++) {
        __m512i sums[2][INT8_ROWS_PER_TILE], weight_sums[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
        for (int j = 0; j < 2; j++)
            for (int r = 0; r < MT; r++) sums[j][r] = _mm512_setzero_si512();
        if (FORMAT == GEMM_Q4_1) {
            for (int c = 0; c < 4; c++) {
                __m512i low[2], high[2];
                for (int j = 0; j < 2; j++) {
                    const __m512i chunk = _mm512_loadu_si512(panel[j] + b * block_bytes + 64 + c * 64);
                    low[j] = _mm512_and_si512(chunk, nibble);
                    high[j] = _mm512_and_si512(_mm512_srli_epi16(chunk, 4), nibble);
                }
                for (int r = 0; r < MT; r++) {
                    const int32_t *x = (const int32_t *)(codes + (m0 + r) * k + b * GGML_BLOCK + 8 * c);
                    const __m512i first = _mm512_set1_epi32(x[0]), second = _mm512_set1_epi32(x[1]);
                    for (int j = 0; j < 2; j++)
                        sums[j][r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sums[j][r], low[j], first), high[j],
                                                         second);
                }
            }
        } else {
            for (int t = 0; t < GGML_BLOCK / 4; t++) {
                __m512i w[2];
                for (int j = 0; j < 2; j++) {
                    w[j] = _mm512_permutexvar_epi16(interleave,
                                                    _mm512_loadu_si512(panel[j] + b * block_bytes + 32 + t * 64));
                    weight_sums[j] = _mm512_dpbusd_epi32(weight_sums[j], ones, w[j]);
                }
                for (int r = 0; r < MT; r++) {
                    const __m512i x = _mm512_set1_epi32(((const int32_t *)(codes + (m0 + r) * k + b * GGML_BLOCK))[t]);
                    for (int j = 0; j < 2; j++) sums[j][r] = _mm512_dpbusd_epi32(sums[j][r], x, w[j]);
                }
            }
        }
        for (int j = 0; j < 2; j++) {
            const uint8_t *block = panel[j] + b * block_bytes;
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)block));
            const __m512i offset = _mm512_slli_epi32(weight_sums[j], 7); /* Q8_0: 128 sum q_w */
            for (int r = 0; r < MT; r++) {
                const __m512i exact = FORMAT == GEMM_Q4_1 ? sums[j][r] : _mm512_sub_epi32(sums[j][r], offset);
                const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(scales[(m0 + r) * blocks + b]));
                acc[j][r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(exact), acc[j][r]);
                if (FORMAT == GEMM_Q4_1)
                    acc[j][r] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + 32))),
                                                _mm512_set1_ps(x_sums[(m0 + r) * blocks + b]), acc[j][r]);
            }
        }
    }
    for (int j = 0; j < 2; j++) store_panel(g, acc[j], v0 + j, m0, MT);
}

static inline __attribute__((always_inline)) void int8_item(const Gemm *g, const uint8_t *codes, const float *scales,
                                                            const float *x_sums, long item, const int FORMAT) {
    const long v0 = item * 2;
    long m0 = 0;
    for (; m0 + INT8_ROWS_PER_TILE <= g->m; m0 += INT8_ROWS_PER_TILE)
        int8_tile(g, codes, scales, x_sums, v0, m0, INT8_ROWS_PER_TILE, FORMAT);
    switch (g->m - m0) {
#define TAIL(t) case t: int8_tile(g, codes, scales, x_sums, v0, m0, t, FORMAT); break;
        TAIL(1) TAIL(2) TAIL(3)
#undef TAIL
        default: break;
    }
}

/* y = x @ W^T for Q4_1 or Q8_0 blocks through int8 activations; 0 when out of memory. */
static int int8_linear(const Gemm *g, int format, int threads) {
    const long k = g->k_pairs * 2, blocks = k / GGML_BLOCK;
    uint8_t *codes = malloc((size_t)(g->m * k));
    float *scales = malloc(sizeof(float) * (size_t)(g->m * blocks)), *x_sums = NULL;
    if (format == GEMM_Q4_1 && (x_sums = malloc(sizeof(float) * (size_t)(g->m * blocks))))
        block_sums(g, x_sums);
    if (!codes || !scales || (format == GEMM_Q4_1 && !x_sums)) {
        free(codes), free(scales), free(x_sums);
        return 0;
    }
    quantize_activations(g, format, codes, scales);
    const long items = (num_panels(g) + 1) / 2;
    const int workers = g->m * g->n * k >= GEMM_PARALLEL_THRESHOLD && threads > 1 ? threads : 1;
    const long items_per_take = work_chunk(g->m, items, workers);
#pragma omp parallel for num_threads(workers) schedule(dynamic, items_per_take)
    for (long item = 0; item < items; item++) {
        if (format == GEMM_Q4_1) int8_item(g, codes, scales, x_sums, item, GEMM_Q4_1);
        else int8_item(g, codes, scales, x_sums, item, GEMM_Q8_0);
    }
    free(codes), free(scales), free(x_sums);
    return 1;
}
#else
#define HAVE_INT8_GEMM 0
#endif

/* ---- Packing: ggml rows of blocks into the panel layouts above (once, at load) ------------------- */

/* Rows of ggml blocks (out, blocks per row) into the panels of `format` (GEMM_Q4_1 or GEMM_Q8_0);
 * outputs past `out` are zero. Q4_1 blocks: fp16 d, fp16 m, 16 bytes whose low nibbles are inputs 0-15
 * and high nibbles 16-31. Q8_0 blocks: fp16 d, 32 int8. */
static void pack_ggml_rows(int format, const uint8_t *src, uint8_t *dst, long out, long blocks) {
    const long file_bytes = format == GEMM_Q4_1 ? 20 : 34;
    const long packed_bytes = format == GEMM_Q4_1 ? Q4_BLOCK_BYTES : Q8_BLOCK_BYTES;
    memset(dst, 0, (size_t)((out + 15) / 16 * blocks * packed_bytes));
    for (long row = 0; row < out; row++) {
        const int o = (int)(row % 16);
        for (long b = 0; b < blocks; b++) {
            const uint8_t *s = src + (row * blocks + b) * file_bytes;
            uint8_t *block = dst + ((row / 16) * blocks + b) * packed_bytes;
            memcpy(block + 2 * o, s, 2); /* d */
            if (format == GEMM_Q8_0) {
                for (int pair = 0; pair < GGML_BLOCK / 2; pair++)
                    memcpy(block + 32 + pair * 32 + 2 * o, s + 2 + 2 * pair, 2);
                continue;
            }
            memcpy(block + 32 + 2 * o, s + 2, 2); /* m */
            uint16_t *words = (uint16_t *)(block + 64); /* 4 chunks x 32 words, little-endian */
            for (int k = 0; k < GGML_BLOCK; k++) {
                const int q = k < 16 ? s[4 + k] & 15 : s[4 + k - 16] >> 4;
                const int pair = k / 2, chunk = pair / 4, nibble = pair % 4;
                words[chunk * 32 + 2 * o + k % 2] |= (uint16_t)(q << (4 * nibble));
            }
        }
    }
}


#include "grouped_kernels.h"

#include "amx_gemm.h"

#include "avx2_gemm.h"

/* y (m, n) = x (m, 2 k_pairs) @ W^T with W packed in `format`; 0 when out of memory. Needs
 * HAVE_BF16_GEMM; ggml formats need 2 k_pairs to be a multiple of GGML_BLOCK, grouped weights to have
 * 2 k_pairs inputs (the caller checks). */
static int gemm_linear(int format, const uint16_t *x, const void *w, uint16_t *y, long m, long n, long k_pairs,
                       long x_stride, long y_stride, int threads) {
#if HAVE_AVX2_GEMM
    const Gemm g = {x, w, y, m, n, k_pairs, x_stride, y_stride};
    if (format == GEMM_Q4_1 || format == GEMM_Q8_0) return avx2_ggml_linear(&g, format, threads);
    if (format != GEMM_DENSE) return 0; /* bf16_gemm.c refuses the other block formats first: they need AVX-512 */
    return avx2_linear(&g, threads);
#elif HAVE_AVX512_GEMM
    const Gemm g = {x, w, y, m, n, k_pairs, x_stride, y_stride};
    if (format == GEMM_GROUPED) return grouped_linear(g, (const GroupedHeader *)w, threads);
    if (format == GEMM_Q4_1_INT8 || format == GEMM_Q8_0_INT8) {
        format = format == GEMM_Q4_1_INT8 ? GEMM_Q4_1 : GEMM_Q8_0;
#if HAVE_INT8_GEMM
        if (m >= INT8_MIN_ROWS) return int8_linear(&g, format, threads);
#endif
    }
#if HAVE_AMX_GEMM
    if (format == GEMM_DENSE || format == GEMM_Q4_1_TILES || format == GEMM_Q8_0_TILES) {
        const int done = amx_linear(&g, format == GEMM_DENSE ? GEMM_DENSE : format == GEMM_Q4_1_TILES ? GEMM_Q4_1
                                                                                                  : GEMM_Q8_0, threads);
        if (done >= 0) return done;
    }
#endif
    /* Without the tiles (AMX turned off since the weight was prepared) the blocks' own kernel computes it. */
    if (format == GEMM_Q4_1_TILES || format == GEMM_Q8_0_TILES) format = format == GEMM_Q4_1_TILES ? GEMM_Q4_1 : GEMM_Q8_0;
    const long per_item = format == GEMM_DENSE ? PANELS_PER_BLOCK : ggml_panels_per_item(m);
    const long items = (num_panels(&g) + per_item - 1) / per_item;
    const int workers = m * n * k_pairs * 2 >= GEMM_PARALLEL_THRESHOLD && threads > 1 ? threads : 1;
    float *x_sums = NULL;
    if (format == GEMM_Q4_1) {
        x_sums = malloc(sizeof(float) * (size_t)(m * k_pairs * 2 / GGML_BLOCK + 1));
        if (!x_sums) return 0;
        block_sums(&g, x_sums);
    }
    const long items_per_take = work_chunk(m, items, workers);
#pragma omp parallel for num_threads(workers) schedule(dynamic, items_per_take)
    for (long item = 0; item < items; item++) {
        if (format == GEMM_DENSE) dense_block(&g, item);
        else ggml_run(&g, x_sums, item, format);
    }
    free(x_sums);
    return 1;
#else
    return 0;
#endif
}

#endif
