/*
 * The dense linear of gemm_kernels.h on CPUs with AVX2 and FMA but no AVX-512 (AMD Zen 1-3, Intel client
 * cores and Xeons before Skylake-SP): the same packed bf16 panels, read 256 bits at a time.
 *
 * With no bf16 dot product, a pair's 32-bit word gives its even input's weight as float32 shifted up 16
 * bits and its odd one's masked. The rows of x are converted to float32 once per call, so each weight
 * vector meets a broadcast float from memory in one FMA per row. Output o's sum runs over its inputs in
 * one order, one FMA each, whatever the tile or the batch, and is rounded to bf16 once at the end: a row's
 * result does not depend on the batch it runs in.
 *
 * Panels (16 outputs) are split into two halves of 8 lanes. One or two rows take two panels per work item
 * (four independent accumulator chains per row hide the FMA latency); more rows take one panel and up to
 * AVX2_ROWS rows per pass, each weight vector serving them all.
 *
 * A GGUF's Q4_1 and Q8_0 blocks (gemm_kernels.h's packed layouts, unchanged) run below GGML_MAX_ROWS rows
 * against the activations as int16: per row and block of 32 inputs, x = c 2^k with k chosen from the
 * block's largest |x| so the codes c fit 15 bits. For bf16 x that is exact for every input within a factor
 * of 2^7 of the block's largest (smaller ones keep an absolute error under 2^(k-1)), finer than the bf16
 * rounding of x the AVX512 kernel multiplies. vpmaddwd sums the integer products S = sum q c exactly in
 * int32, and per block the output gains d 2^k S (Q4_1 also m sum(x), the float32 sum of x): the
 * dequantized weight d q + m exactly, from 0.625 (Q8_0: 1.06) bytes a weight instead of 2. Exact float32
 * blocks (128 + q as bf16 bits, as the AVX512 kernel does) were measured first on an AMD EPYC (Zen 1, whose
 * 256-bit ops split in two): 19.2 ms for SmolLM2's linears at one row against 13.3 ms for the dense
 * panels, bound by their float unpacking arithmetic (benchmarks/NOTES.md sections 35 and 36).
 */
#ifndef TOKENMILL_AVX2_GEMM_H
#define TOKENMILL_AVX2_GEMM_H

#if HAVE_AVX2_GEMM
#define AVX2_ROWS 4 /* rows per pass over a panel: 8 accumulators, 4 weight vectors, broadcasts */
#define AVX2_PREFETCH_PAIRS 16
#define AI static inline __attribute__((always_inline))

/* The rows of bf16 x as float32, (m, 2 k_pairs) contiguous. */
static void avx2_x_to_f32(const Gemm *g, float *xf) {
    const long k = g->k_pairs * 2;
    for (long r = 0; r < g->m; r++) {
        const uint16_t *src = g->x + r * g->x_stride;
        float *dst = xf + r * k;
        long i = 0;
        for (; i + 8 <= k; i += 8) {
            const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
            _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
        }
        for (; i < k; i++) dst[i] = bf16_to_f32(src[i]);
    }
}

/* 8 float32 lanes to bf16 bit patterns in the low 16 bits of each 32-bit lane, rounded to nearest even as
 * f32_to_bf16 does (NaN stays NaN). */
AI __m256i avx2_round_bf16(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i bias = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(rounded, quiet, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

/* Rows m0 .. m0+MT-1 of panel v (outputs 16v .. 16v+15) from their two halves' accumulators. */
AI void avx2_store_panel(const Gemm *g, const __m256 acc[2][AVX2_ROWS], long v, long m0, const int MT) {
    const long left = g->n - v * 16;
    if (left <= 0) return;
    for (int r = 0; r < MT; r++) {
        /* packus interleaves 128-bit halves: lanes (0-3, 8-11, 4-7, 12-15); the permute puts them in order. */
        const __m256i words = _mm256_permute4x64_epi64(
            _mm256_packus_epi32(avx2_round_bf16(acc[0][r]), avx2_round_bf16(acc[1][r])), 0xD8);
        uint16_t *dst = g->y + (m0 + r) * g->y_stride + v * 16;
        if (left >= 16) {
            _mm256_storeu_si256((__m256i *)dst, words);
        } else {
            uint16_t all[16];
            _mm256_storeu_si256((__m256i *)all, words);
            memcpy(dst, all, (size_t)left * sizeof(uint16_t));
        }
    }
}

/* One input pair's weights of 8 outputs, as float32 (even input, odd input), from a bf16 panel half. */
AI void avx2_dense_pair(const uint16_t *half, __m256 *even, __m256 *odd) {
    const __m256i raw = _mm256_loadu_si256((const __m256i *)half);
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32((int)0xFFFF0000)));
}

/* Adds one input pair's products: acc += w_even x[2p] + w_odd x[2p + 1], for each row of the pass. */
AI void avx2_fma_pair(__m256 acc[AVX2_ROWS], __m256 even, __m256 odd, const float *const *x, long p, const int MT) {
    for (int r = 0; r < MT; r++)
        acc[r] = _mm256_fmadd_ps(odd, _mm256_broadcast_ss(x[r] + 2 * p + 1),
                                 _mm256_fmadd_ps(even, _mm256_broadcast_ss(x[r] + 2 * p), acc[r]));
}

/* Rows m0 .. m0+MT-1 against NP panels from panel v0 (those past the last are computed from the last and not
 * stored). */
AI void avx2_tile(const Gemm *g, const float *xf, long v0, long m0, const int MT, const int NP) {
    const long k = g->k_pairs * 2, panels = num_panels(g);
    const uint16_t *panel[2];
    for (int j = 0; j < NP; j++)
        panel[j] = (const uint16_t *)g->w + (v0 + j < panels ? v0 + j : panels - 1) * g->k_pairs * 32;
    const float *x[AVX2_ROWS];
    for (int r = 0; r < MT; r++) x[r] = xf + (m0 + r) * k;
    __m256 acc[2][2][AVX2_ROWS];
    for (int j = 0; j < NP; j++)
        for (int h = 0; h < 2; h++)
            for (int r = 0; r < MT; r++) acc[j][h][r] = _mm256_setzero_ps();
    for (long p = 0; p < g->k_pairs; p++)
        for (int j = 0; j < NP; j++) {
            const uint16_t *w = panel[j] + p * 32;
            _mm_prefetch((const char *)(w + AVX2_PREFETCH_PAIRS * 32), _MM_HINT_T0); /* never faults */
            for (int h = 0; h < 2; h++) {
                __m256 even, odd;
                avx2_dense_pair(w + 16 * h, &even, &odd);
                avx2_fma_pair(acc[j][h], even, odd, x, p, MT);
            }
        }
    for (int j = 0; j < NP; j++) avx2_store_panel(g, acc[j], v0 + j, m0, MT);
}

/* Panels per work item: two for one or two rows (more accumulator chains), else one. */
static inline int avx2_panels_per_item(long m) { return m <= 2 ? 2 : 1; }

/* Work item `item`: NP panels against every row, MT_MAX rows a pass. */
AI void avx2_item(const Gemm *g, const float *xf, long item, const int NP, const int MT_MAX) {
    const long v0 = item * NP;
    long m0 = 0;
    for (; m0 + MT_MAX <= g->m; m0 += MT_MAX) avx2_tile(g, xf, v0, m0, MT_MAX, NP);
    switch (g->m - m0) {
        case 1: avx2_tile(g, xf, v0, m0, 1, NP); break;
        case 2: if (MT_MAX > 2) avx2_tile(g, xf, v0, m0, 2, NP); break;
        case 3: if (MT_MAX > 3) avx2_tile(g, xf, v0, m0, 3, NP); break;
        default: break;
    }
}

/* y = x @ W^T for dense panels; 0 when out of memory. */
static int avx2_linear(const Gemm *g, int threads) {
    const long k = g->k_pairs * 2;
    float *xf = malloc(sizeof(float) * (size_t)(g->m * k + 1));
    if (!xf) return 0;
    avx2_x_to_f32(g, xf);
    const int per_item = avx2_panels_per_item(g->m);
    const long items = (num_panels(g) + per_item - 1) / per_item;
    const int workers = g->m * g->n * k >= GEMM_PARALLEL_THRESHOLD && threads > 1 ? threads : 1;
    const long items_per_take = work_chunk(g->m, items, workers);
#pragma omp parallel for num_threads(workers) schedule(dynamic, items_per_take)
    for (long item = 0; item < items; item++) {
        if (per_item == 2) avx2_item(g, xf, item, 2, 2);
        else avx2_item(g, xf, item, 1, AVX2_ROWS);
    }
    free(xf);
    return 1;
}
/* ---- GGUF blocks against int16 activations ------------------------------------------------------ */

#define AVX2_GGML_PREFETCH_BLOCKS 2

/* Each row's blocks of 32 inputs quantized: codes (m, k) int16 with x = code 2^k (scales[r, b] = 2^k), and
 * sums[r, b] the float32 sum of the block's x (Q4_1's minimums multiply it). */
typedef struct {
    int16_t *codes;
    float *scales, *sums;
} Int16Rows;

/* The largest exponent k keeps |code| <= 32640: codes of a bf16 x (8 significant bits) are exact down to 2^7
 * below the block's largest. k stays >= -112 so 2^-k is a normal float; a block of zeros gets codes 0. */
static void avx2_quantize_block(const uint16_t *src, int16_t *codes, float *scale, float *sum) {
    __m256 v[4];
    for (int i = 0; i < 4; i++)
        v[i] = _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + 8 * i))), 16));
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const float top = reduce_max8(
        _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], magnitude), _mm256_and_ps(v[1], magnitude)),
                      _mm256_max_ps(_mm256_and_ps(v[2], magnitude), _mm256_and_ps(v[3], magnitude))));
    uint32_t bits;
    memcpy(&bits, &top, sizeof bits);
    int k = (int)((bits >> 23) & 0xFF) - 127 - 14;
    if (k < -112) k = -112;
    *scale = ldexpf(1.f, k);
    const __m256 inverse = _mm256_set1_ps(ldexpf(1.f, -k));
    __m256i c[4];
    for (int i = 0; i < 4; i++) c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse)); /* nearest even */
    /* packs interleaves 128-bit halves; the permute puts the 16 codes back in order. */
    _mm256_storeu_si256((__m256i *)codes, _mm256_permute4x64_epi64(_mm256_packs_epi32(c[0], c[1]), 0xD8));
    _mm256_storeu_si256((__m256i *)(codes + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(c[2], c[3]), 0xD8));
    *sum = reduce_add8(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
}

static void avx2_quantize_rows(const Gemm *g, const Int16Rows *xq) {
    const long k = g->k_pairs * 2, blocks = k / GGML_BLOCK;
    for (long r = 0; r < g->m; r++)
        for (long b = 0; b < blocks; b++)
            avx2_quantize_block(g->x + r * g->x_stride + b * GGML_BLOCK, xq->codes + r * k + b * GGML_BLOCK,
                                xq->scales + r * blocks + b, xq->sums + r * blocks + b);
}

/* One row against panel v of Q4_1 blocks, both halves at once (one broadcast pair of codes serves 16 outputs).
 * Nibble t of a word stays in place, masked (the top one shifted down): its products come out 16^t times
 * too large, exactly, so each t keeps its own int32 sum and the block shifts them back (the largest,
 * t = 2: 4 x 2 x 15 x 256 x 32640 < 2^31). */
AI void avx2_q4_1_row(const Gemm *g, const Int16Rows *xq, long v, long row) {
    const long k = g->k_pairs * 2, blocks = k / GGML_BLOCK;
    const uint8_t *panel = (const uint8_t *)g->w + v * blocks * Q4_BLOCK_BYTES;
    const int32_t *x_pairs = (const int32_t *)(xq->codes + row * k);
    const float *scales = xq->scales + row * blocks, *sums = xq->sums + row * blocks;
    const __m256i masks[3] = {_mm256_set1_epi16(0x000F), _mm256_set1_epi16(0x00F0), _mm256_set1_epi16(0x0F00)};
    __m256 acc[2][AVX2_ROWS] = {{_mm256_setzero_ps()}, {_mm256_setzero_ps()}};
    for (long b = 0; b < blocks; b++) {
        const uint8_t *block = panel + b * Q4_BLOCK_BYTES;
        for (long l = 0; l < Q4_BLOCK_BYTES; l += 64)
            _mm_prefetch((const char *)(block + AVX2_GGML_PREFETCH_BLOCKS * Q4_BLOCK_BYTES + l), _MM_HINT_T0);
        const int32_t *pairs = x_pairs + b * (GGML_BLOCK / 2);
        __m256i s[2][4];
        for (int h = 0; h < 2; h++)
            for (int t = 0; t < 4; t++) s[h][t] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i chunk[2] = {_mm256_loadu_si256((const __m256i *)(block + 64 + c * 64)),
                                      _mm256_loadu_si256((const __m256i *)(block + 96 + c * 64))};
            for (int t = 0; t < 4; t++) {
                const __m256i x = _mm256_set1_epi32(pairs[4 * c + t]);
                for (int h = 0; h < 2; h++) {
                    const __m256i w = t == 3 ? _mm256_srli_epi16(chunk[h], 12) : _mm256_and_si256(chunk[h], masks[t]);
                    s[h][t] = _mm256_add_epi32(s[h][t], _mm256_madd_epi16(w, x));
                }
            }
        }
        const __m256 scale = _mm256_set1_ps(scales[b]), sum = _mm256_set1_ps(sums[b]);
        for (int h = 0; h < 2; h++) {
            const __m256i total = _mm256_add_epi32(
                _mm256_add_epi32(s[h][0], _mm256_srai_epi32(s[h][1], 4)),
                _mm256_add_epi32(_mm256_srai_epi32(s[h][2], 8), s[h][3]));
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(block + 16 * h)));
            const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(block + 32 + 16 * h)));
            acc[h][0] = _mm256_fmadd_ps(m, sum, _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(d, scale), acc[h][0]));
        }
    }
    avx2_store_panel(g, acc, v, row, 1);
}

/* One row against panel v of Q8_0 blocks, both halves at once. */
AI void avx2_q8_0_row(const Gemm *g, const Int16Rows *xq, long v, long row) {
    const long k = g->k_pairs * 2, blocks = k / GGML_BLOCK;
    const uint8_t *panel = (const uint8_t *)g->w + v * blocks * Q8_BLOCK_BYTES;
    const int32_t *x_pairs = (const int32_t *)(xq->codes + row * k);
    const float *scales = xq->scales + row * blocks;
    __m256 acc[2][AVX2_ROWS] = {{_mm256_setzero_ps()}, {_mm256_setzero_ps()}};
    for (long b = 0; b < blocks; b++) {
        const uint8_t *block = panel + b * Q8_BLOCK_BYTES;
        for (long l = 0; l < Q8_BLOCK_BYTES; l += 64)
            _mm_prefetch((const char *)(block + AVX2_GGML_PREFETCH_BLOCKS * Q8_BLOCK_BYTES + l), _MM_HINT_T0);
        const int32_t *pairs = x_pairs + b * (GGML_BLOCK / 2);
        __m256i s[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int p = 0; p < GGML_BLOCK / 2; p++) {
            const __m256i x = _mm256_set1_epi32(pairs[p]);
            for (int h = 0; h < 2; h++)
                s[h] = _mm256_add_epi32(s[h], _mm256_madd_epi16(
                    _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(block + 32 + p * 32 + 16 * h))), x));
        }
        const __m256 scale = _mm256_set1_ps(scales[b]);
        for (int h = 0; h < 2; h++) {
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(block + 16 * h)));
            acc[h][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[h]), _mm256_mul_ps(d, scale), acc[h][0]);
        }
    }
    avx2_store_panel(g, acc, v, row, 1);
}

/* Rows m0 .. m0+MT-1 (MT <= 2) against panel v, both halves at once: one broadcast serves 16 outputs. Each
 * block's integer sums take one int32 chain per row and half. */
AI void avx2_ggml_pair_tile(const Gemm *g, const Int16Rows *xq, long v, long m0, const int MT, const int FORMAT) {
    const long k = g->k_pairs * 2, blocks = k / GGML_BLOCK;
    const long block_bytes = FORMAT == GEMM_Q4_1 ? Q4_BLOCK_BYTES : Q8_BLOCK_BYTES;
    const uint8_t *panel = (const uint8_t *)g->w + v * blocks * block_bytes;
    const int32_t *x_pairs[2];
    const float *scales[2], *sums[2];
    for (int r = 0; r < MT; r++) {
        x_pairs[r] = (const int32_t *)(xq->codes + (m0 + r) * k);
        scales[r] = xq->scales + (m0 + r) * blocks;
        sums[r] = xq->sums + (m0 + r) * blocks;
    }
    const __m256i nibble = _mm256_set1_epi16(0x000F);
    __m256 acc[2][AVX2_ROWS];
    for (int h = 0; h < 2; h++)
        for (int r = 0; r < MT; r++) acc[h][r] = _mm256_setzero_ps();
    for (long b = 0; b < blocks; b++) {
        const uint8_t *block = panel + b * block_bytes;
        for (long l = 0; l < block_bytes; l += 64)
            _mm_prefetch((const char *)(block + AVX2_GGML_PREFETCH_BLOCKS * block_bytes + l), _MM_HINT_T0);
        const long pair0 = b * (GGML_BLOCK / 2);
        __m256i s[2][2];
        for (int h = 0; h < 2; h++)
            for (int r = 0; r < MT; r++) s[h][r] = _mm256_setzero_si256();
        if (FORMAT == GEMM_Q4_1) {
            for (int c = 0; c < 4; c++) {
                const __m256i chunk[2] = {_mm256_loadu_si256((const __m256i *)(block + 64 + c * 64)),
                                          _mm256_loadu_si256((const __m256i *)(block + 96 + c * 64))};
                for (int t = 0; t < 4; t++) {
                    __m256i w[2];
                    for (int h = 0; h < 2; h++)
                        w[h] = t == 3 ? _mm256_srli_epi16(chunk[h], 12)
                                      : _mm256_and_si256(t ? _mm256_srli_epi16(chunk[h], 4 * t) : chunk[h], nibble);
                    for (int r = 0; r < MT; r++) {
                        const __m256i x = _mm256_set1_epi32(x_pairs[r][pair0 + 4 * c + t]);
                        for (int h = 0; h < 2; h++) s[h][r] = _mm256_add_epi32(s[h][r], _mm256_madd_epi16(w[h], x));
                    }
                }
            }
        } else {
            for (int p = 0; p < GGML_BLOCK / 2; p++) {
                __m256i w[2];
                for (int h = 0; h < 2; h++)
                    w[h] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(block + 32 + p * 32 + 16 * h)));
                for (int r = 0; r < MT; r++) {
                    const __m256i x = _mm256_set1_epi32(x_pairs[r][pair0 + p]);
                    for (int h = 0; h < 2; h++) s[h][r] = _mm256_add_epi32(s[h][r], _mm256_madd_epi16(w[h], x));
                }
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(block + 16 * h)));
            for (int r = 0; r < MT; r++)
                acc[h][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[h][r]), _mm256_mul_ps(d, _mm256_set1_ps(scales[r][b])),
                                            acc[h][r]);
            if (FORMAT == GEMM_Q4_1) {
                const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(block + 32 + 16 * h)));
                for (int r = 0; r < MT; r++) acc[h][r] = _mm256_fmadd_ps(m, _mm256_set1_ps(sums[r][b]), acc[h][r]);
            }
        }
    }
    avx2_store_panel(g, acc, v, m0, MT);
}

/* Every row against panel v: a lone row by its own kernel, more in pairs (the dense panels are as fast from two
 * rows, and quant.py's GGML_MAX_ROWS sends a step's rows there from two). */
AI void avx2_ggml_panel(const Gemm *g, const Int16Rows *xq, long v, const int FORMAT) {
    long m0 = 0;
    for (; m0 + 2 <= g->m; m0 += 2) avx2_ggml_pair_tile(g, xq, v, m0, 2, FORMAT);
    if (m0 == g->m) return;
    if (FORMAT == GEMM_Q4_1) avx2_q4_1_row(g, xq, v, m0);
    else avx2_q8_0_row(g, xq, v, m0);
}

/* y = x @ W^T for Q4_1 or Q8_0 blocks; 0 when out of memory. */
static int avx2_ggml_linear(const Gemm *g, int format, int threads) {
    const long k = g->k_pairs * 2, blocks = k / GGML_BLOCK;
    Int16Rows xq = {malloc(sizeof(int16_t) * (size_t)(g->m * k + 1)), malloc(sizeof(float) * (size_t)(g->m * blocks + 1)),
                    malloc(sizeof(float) * (size_t)(g->m * blocks + 1))};
    if (!xq.codes || !xq.scales || !xq.sums) {
        free(xq.codes), free(xq.scales), free(xq.sums);
        return 0;
    }
    avx2_quantize_rows(g, &xq);
    const long panels = num_panels(g);
    const int workers = g->m * g->n * k >= GEMM_PARALLEL_THRESHOLD && threads > 1 ? threads : 1;
    const long items_per_take = work_chunk(g->m, panels, workers);
#pragma omp parallel for num_threads(workers) schedule(dynamic, items_per_take)
    for (long v = 0; v < panels; v++) {
        if (format == GEMM_Q4_1) avx2_ggml_panel(g, &xq, v, GEMM_Q4_1);
        else avx2_ggml_panel(g, &xq, v, GEMM_Q8_0);
    }
    free(xq.codes), free(xq.scales), free(xq.sums);
    return 1;
}
#undef AI
#endif

#endif
