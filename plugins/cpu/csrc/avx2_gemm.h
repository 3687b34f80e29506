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
 * No kernel reads GGUF blocks here: measured on an AMD EPYC (Zen 1, whose 256-bit ops split in two), the
 * exact Q4_1 blocks in float32 (128 + q as bf16 bits, as the AVX512 kernel does) took 19.2 ms for SmolLM2's
 * linears at one row against 13.3 ms for these dense panels, bound by the unpacking arithmetic and not by
 * bytes (benchmarks/NOTES.md section 35), so a GGUF's weights take the dense form on AVX2.
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
#pragma omp parallel for num_threads(workers) schedule(static)
    for (long item = 0; item < items; item++) {
        if (per_item == 2) avx2_item(g, xf, item, 2, 2);
        else avx2_item(g, xf, item, 1, AVX2_ROWS);
    }
    free(xf);
    return 1;
}
#undef AI
#endif

#endif
