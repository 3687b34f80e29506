/*
 * The dense bf16 linear on AMX tiles (Sapphire Rapids and later Xeons), for many rows of x.
 *
 * One `tdpbf16ps` multiplies a 16 x 32 bf16 tile of x by a 32 x 16 tile of W into 16 x 16 float32
 * accumulators: 8,192 multiply-adds, where `vdpbf16ps` does 32. The dense layout of gemm_kernels.h is
 * already AMX's B-tile layout: a panel's 16 consecutive input pairs of 16 outputs x 2 inputs are one
 * 16-row, 64-byte-wide tile, so the same packed weight serves both kernels. x is read as A tiles in place,
 * 16 rows by 32 inputs; the rows past the last full 32 come from a zero-padded copy.
 *
 * Each output is the float32 sum of its products, input pair by input pair in order, rounded to bf16 once,
 * as the AVX512-BF16 kernel computes it, and a row's result does not depend on the rows beside it.
 *
 * GGUF Q4_1 and Q8_0 blocks run on the tiles too (GEMM_Q4_1_TILES, GEMM_Q8_0_TILES): each block is
 * dequantized to bf16 in L1 as its B tile is needed, to the dense copy's values, so many rows read 0.625
 * (Q8_0: 1.06) bytes a weight instead of the dense copy's 2, and no dense copy need be kept.
 *
 * Whether the process may use the tiles: amx_tiles.h (TOKENMILL_CPU_AMX=0 keeps the AVX512-BF16 kernel).
 */
#ifndef TOKENMILL_AMX_GEMM_H
#define TOKENMILL_AMX_GEMM_H

#include "amx_tiles.h"

#if HAVE_AMX_TILES && HAVE_AVX512_GEMM
#define HAVE_AMX_GEMM 1
#define AMX_CHUNK_ROWS 32 /* rows of x per pass over a work item's weights: two A tiles */
#define AMX_X_BLOCK_BYTES (768 << 10) /* rows of x a block of many rows holds: a third of a 2 MB L2 */
/* How far ahead the kernels ask for their weights (software prefetch into L1): a weight tile that misses cache
 * holds up the products after it, and the hardware prefetcher starts over at each 4 KiB page. Measured: the 1B's
 * dense linears at 64 rows, cold, 131.9 -> 118.8 ms; SmolLM2's Q4_1 blocks at 16 rows 9.0 -> 8.0 ms, at 128 rows
 * (dequantized once for many rows) 23.3 -> 21.0 ms, its 16-stream decode step 16.7 -> 13.4 ms. 32, 64 and 128
 * pairs, 2, 4 and 8 blocks are within a few per cent of each other; one A tile of rows (dense, 16 or fewer)
 * gains nothing. */
#define AMX_PREFETCH_PAIRS 32
#define AMX_PREFETCH_BLOCKS 8

/* Tiles 0-3 accumulate (A row tile 0 or 1 x panel 0 or 1), 4-5 hold x, 6-7 the two weight panels. */
static void amx_configure(void) {
    AmxTileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) amx_shape(&cfg, t, AMX_TILE_ROWS, 64);
    _tile_loadconfig(&cfg);
}

/* Accumulator tile `tile` (16 rows x 16 float32) to bf16 outputs of panel v, rows m0 .. m0+rows-1. */
#define AMX_STORE(tile, v, m0, rows)                                                                 \
    do {                                                                                             \
        float acc_[AMX_TILE_ROWS][16];                                                               \
        _tile_stored(tile, acc_, 64);                                                                \
        const long left_ = g->n - (v) * 16;                                                          \
        const __mmask16 mask_ = left_ >= 16 ? 0xFFFF : (__mmask16)((1u << left_) - 1);               \
        for (long r_ = 0; r_ < (rows); r_++)                                                         \
            _mm256_mask_storeu_epi16(g->y + ((m0) + r_) * g->y_stride + (v) * 16, mask_,             \
                                     (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(acc_[r_])));        \
    } while (0)

/* Rows m0 .. m0+rows-1 (rows <= 32) of x, read from `x` with `x_stride`, against dense panels w0 and w1
 * (the second stored only when nv is 2), outputs of panels v0 and v0+1. */
static inline void amx_chunk(const Gemm *g, const uint16_t *x, long x_stride, const uint16_t *w0, const uint16_t *w1,
                             long v0, int nv, long m0, long rows) {
    const int two = rows > AMX_TILE_ROWS;
    const long x_bytes = x_stride * 2;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (long p = 0; p < g->k_pairs; p += AMX_TILE_ROWS) {
        if (two) { /* prefetches past the panel's end ask for the next item's weights, or nothing: they never fault */
            const char *a = (const char *)(w0 + (p + AMX_PREFETCH_PAIRS) * 32);
            const char *b = (const char *)(w1 + (p + AMX_PREFETCH_PAIRS) * 32);
            for (int l = 0; l < AMX_TILE_ROWS; l++) {
                _mm_prefetch(a + l * 64, _MM_HINT_T0);
                _mm_prefetch(b + l * 64, _MM_HINT_T0);
            }
        }
        _tile_loadd(6, w0 + p * 32, 64);
        _tile_loadd(7, w1 + p * 32, 64);
        _tile_loadd(4, x + p * 2, x_bytes);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two) {
            _tile_loadd(5, x + AMX_TILE_ROWS * x_stride + p * 2, x_bytes);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    const long first = rows < AMX_TILE_ROWS ? rows : AMX_TILE_ROWS;
    AMX_STORE(0, v0, m0, first);
    if (nv > 1) AMX_STORE(1, v0 + 1, m0, first);
    if (two) {
        AMX_STORE(2, v0, m0 + AMX_TILE_ROWS, rows - AMX_TILE_ROWS);
        if (nv > 1) AMX_STORE(3, v0 + 1, m0 + AMX_TILE_ROWS, rows - AMX_TILE_ROWS);
    }
}

/* One panel's ggml block (16 outputs x 32 inputs) as the dense layout's bf16, 16 input pairs x 16 outputs x 2
 * inputs: one B tile. Each weight d q + m (Q4_1) or d q (Q8_0) in float32, exact (an fp16 d times a code of
 * at most 8 bits), rounded to bf16 once, to nearest even: the value the dense copy of the dequantized
 * weight holds. */
static inline void amx_dequantize_block(const uint8_t *block, int format, uint16_t *dst) {
    /* Word 2o + i of a row is output o: lanes 0-15 of a row take outputs 0-7, lanes 16-31 outputs 8-15. */
    const __m512i low_outputs = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i high_outputs = _mm512_add_epi32(low_outputs, _mm512_set1_epi32(8));
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)block));
    const __m512 d_lo = _mm512_permutexvar_ps(low_outputs, d), d_hi = _mm512_permutexvar_ps(high_outputs, d);
    __m512 m_lo = _mm512_setzero_ps(), m_hi = _mm512_setzero_ps();
    if (format == GEMM_Q4_1) {
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + 32)));
        m_lo = _mm512_permutexvar_ps(low_outputs, m);
        m_hi = _mm512_permutexvar_ps(high_outputs, m);
    }
    for (int p = 0; p < GGML_BLOCK / 2; p++) {
        __m512 lo, hi;
        if (format == GEMM_Q4_1) { /* pair 4c + s: nibble s of chunk c's words */
            const __m512i chunk = _mm512_loadu_si512(block + 64 + (p / 4) * 64);
            const __m512i q = _mm512_and_si512(_mm512_srli_epi16(chunk, 4 * (p % 4)), _mm512_set1_epi16(0xF));
            lo = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(q)));
            hi = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(q, 1)));
        } else {
            const int8_t *q = (const int8_t *)(block + 32 + p * 32);
            lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
            hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16))));
        }
        _mm512_store_si512(dst + p * 32, (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(hi, d_hi, m_hi),
                                                                      _mm512_fmadd_ps(lo, d_lo, m_lo)));
    }
}

#define AMX_GGML_CHUNK_ROWS 64 /* rows of x per pass over a panel's blocks: four accumulator tiles */

/* Rows m0 .. m0+rows-1 (rows <= 64) of x against panel v's ggml blocks, each block dequantized once into a
 * B tile in L1 and multiplied by up to four A tiles of 16 rows. */
static inline void amx_ggml_chunk(const Gemm *g, int format, const uint16_t *x, long x_stride, long v, long m0,
                                  long rows) {
    const long blocks = g->k_pairs * 2 / GGML_BLOCK;
    const long block_bytes = format == GEMM_Q4_1 ? Q4_BLOCK_BYTES : Q8_BLOCK_BYTES;
    const uint8_t *panel = (const uint8_t *)g->w + v * blocks * block_bytes;
    const long x_bytes = x_stride * 2, groups = (rows + AMX_TILE_ROWS - 1) / AMX_TILE_ROWS;
    uint16_t weights[2][AMX_TILE_ROWS * 32] __attribute__((aligned(64))); /* two, so a block's stores need not
                                                                               wait for the last one's loads */
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (long b = 0; b < blocks; b++) {
        const char *ahead = (const char *)(panel + (b + AMX_PREFETCH_BLOCKS) * block_bytes);
        for (long l = 0; l < block_bytes; l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
        uint16_t *tile = weights[b & 1];
        amx_dequantize_block(panel + b * block_bytes, format, tile);
        _tile_loadd(6, tile, 64);
        const uint16_t *xb = x + b * GGML_BLOCK;
        _tile_loadd(4, xb, x_bytes);
        _tile_dpbf16ps(0, 4, 6);
        if (groups > 1) {
            _tile_loadd(5, xb + AMX_TILE_ROWS * x_stride, x_bytes);
            _tile_dpbf16ps(1, 5, 6);
        }
        if (groups > 2) {
            _tile_loadd(4, xb + 2 * AMX_TILE_ROWS * x_stride, x_bytes);
            _tile_dpbf16ps(2, 4, 6);
        }
        if (groups > 3) {
            _tile_loadd(5, xb + 3 * AMX_TILE_ROWS * x_stride, x_bytes);
            _tile_dpbf16ps(3, 5, 6);
        }
    }
    for (long group = 0; group < groups; group++) {
        const long left = rows - group * AMX_TILE_ROWS, count = left < AMX_TILE_ROWS ? left : AMX_TILE_ROWS;
        const long first = m0 + group * AMX_TILE_ROWS;
        switch (group) {
            case 0: AMX_STORE(0, v, first, count); break;
            case 1: AMX_STORE(1, v, first, count); break;
            case 2: AMX_STORE(2, v, first, count); break;
            default: AMX_STORE(3, v, first, count); break;
        }
    }
}

/* Panel v's ggml blocks as the dense layout's bf16 (k_pairs x 32 words), block by block. */
static inline void amx_dequantize_panel(const Gemm *g, int format, long v, uint16_t *dst) {
    const long blocks = g->k_pairs * 2 / GGML_BLOCK;
    const long block_bytes = format == GEMM_Q4_1 ? Q4_BLOCK_BYTES : Q8_BLOCK_BYTES;
    const uint8_t *panel = (const uint8_t *)g->w + v * blocks * block_bytes;
    for (long b = 0; b < blocks; b++) {
        const char *ahead = (const char *)(panel + (b + AMX_PREFETCH_BLOCKS) * block_bytes);
        for (long l = 0; l < block_bytes; l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
        amx_dequantize_block(panel + b * block_bytes, format, dst + b * AMX_TILE_ROWS * 32);
    }
}

/* y = x @ W^T on the tiles, W dense (GEMM_DENSE: work items of two panels, 32 rows a pass) or ggml blocks
 * (GEMM_Q4_1, GEMM_Q8_0: 64 rows, items of one panel, in one pass; any other count, as dense items of two
 * panels dequantized once); 1 done, 0 out of memory, -1 not for this call
 * (no AMX, or inputs not a multiple of 32), where the AVX512-BF16 kernels run instead. Dense weights take
 * it at every row count, even one (where both kernels wait on memory and take the same time), so a row's
 * result never depends on its batch. */
static int amx_linear(const Gemm *g, int format, int threads) {
    if (g->k_pairs % AMX_TILE_ROWS || !amx_usable()) return -1;
    const int dense = format == GEMM_DENSE;
    /* A ggml weight's two panels of a work item are dequantized once into a dense copy in L2 and run as dense
     * panels, except for one whole pass of the block kernel (64 rows), where each block dequantized onto its
     * tile feeds four tile products. Past 64 rows the block kernel would dequantize every block again on each
     * pass (a 512-row prompt's linears take 0.67x the time unpacked, faster even than dense weights, which
     * stream from memory). Below, a block feeds one to three products, right after its bf16 was stored for
     * the tile load, and the step ran slower: SmolLM2's decode steps at 8 to 60 rows 7-16 % faster unpacked
     * (benchmarks/NOTES.md section 39), at 64 the same within noise. */
    const int unpacked = !dense && g->m != AMX_GGML_CHUNK_ROWS;
    const long chunk = dense || unpacked ? AMX_CHUNK_ROWS : AMX_GGML_CHUNK_ROWS;
    const long full = g->m / chunk * chunk, tail = g->m - full;
    uint16_t *padded = NULL;
    if (tail) {  /* the last rows, zero-padded to whole A tiles, so every tile load is in bounds */
        const long padded_rows = (tail + AMX_TILE_ROWS - 1) / AMX_TILE_ROWS * AMX_TILE_ROWS;
        padded = calloc((size_t)(padded_rows * g->k_pairs * 2), sizeof(uint16_t));
        if (!padded) return 0;
        for (long r = 0; r < tail; r++)
            memcpy(padded + r * g->k_pairs * 2, g->x + (full + r) * g->x_stride, (size_t)g->k_pairs * 4);
    }
    const long panels = num_panels(g), per_item = dense || unpacked ? PANELS_PER_BLOCK : 1;
    const long items = (panels + per_item - 1) / per_item, panel_words = g->k_pairs * 32;
    /* Many rows (a prompt) go in blocks of rows whose x stays in L2 while every work item's panels pass over
     * it: item by item over all rows read x again from L3 for each item (a 2,000-row gate_up: 96 times 2.3 MB),
     * where blocks read each item's weights again per block instead. A row's arithmetic is the same either way. */
    long block_rows = AMX_X_BLOCK_BYTES / (g->k_pairs * 4) / chunk * chunk;
    if (block_rows < chunk) block_rows = chunk;
    const long row_blocks = full ? (full + block_rows - 1) / block_rows : 1;
    const int workers = g->m * g->n * g->k_pairs * 2 >= GEMM_PARALLEL_THRESHOLD && threads > 1 ? threads : 1;
    const long items_per_take = work_chunk(g->m, row_blocks * items, workers);
    int failed = 0;
#pragma omp parallel num_threads(workers) reduction(| : failed)
    {
        amx_configure();
        uint16_t *unpacked_panels = unpacked ? aligned_alloc(64, (size_t)(2 * panel_words) * sizeof(uint16_t)) : NULL;
        failed = unpacked && !unpacked_panels;
#pragma omp for schedule(dynamic, items_per_take)
        for (long job = 0; job < row_blocks * items; job++) {
            if (failed) continue;
            const long item = job % items, block = job / items;
            const long first_row = block * block_rows, end_row = first_row + block_rows < full ? first_row + block_rows : full;
            const int has_tail = tail && block == row_blocks - 1;
            if (!dense && !unpacked) { /* exactly one 64-row pass: no tail */
                amx_ggml_chunk(g, format, g->x, g->x_stride, item, 0, AMX_GGML_CHUNK_ROWS);
                continue;
            }
            const long v0 = item * PANELS_PER_BLOCK;
            const int nv = panels - v0 < PANELS_PER_BLOCK ? (int)(panels - v0) : PANELS_PER_BLOCK;
            const uint16_t *w0 = (const uint16_t *)g->w + v0 * panel_words;
            if (unpacked) {
                for (int i = 0; i < nv; i++) amx_dequantize_panel(g, format, v0 + i, unpacked_panels + i * panel_words);
                w0 = unpacked_panels;
            }
            const uint16_t *w1 = nv > 1 ? w0 + panel_words : w0;
            for (long m0 = first_row; m0 < end_row; m0 += chunk)
                amx_chunk(g, g->x + m0 * g->x_stride, g->x_stride, w0, w1, v0, nv, m0, chunk);
            if (has_tail) amx_chunk(g, padded, g->k_pairs * 2, w0, w1, v0, nv, full, tail);
        }
        free(unpacked_panels);
        _tile_release();
    }
    free(padded);
    return !failed;
}
#else
#define HAVE_AMX_GEMM 0
#endif

#endif
