/*
 * The small per-token ops between a decoder layer's matmuls, fused, for bf16 on the CPU backend.
 *
 * In PyTorch each of these is 5 to 10 separate ops, each a few microseconds of dispatch for a few
 * thousand elements; at decode sizes they cost as much as an attention layer. Here each is one pass.
 * Every function reproduces the roundings of the PyTorch reference (`tokenmill.interfaces.LayerOps`):
 * float32 arithmetic, a round to bf16 wherever the reference stores a bf16 tensor. layer_ops.c wraps
 * them for Python; arguments are data pointers of tensors the caller has checked.
 */
#ifndef TOKENMILL_LAYER_KERNELS_H
#define TOKENMILL_LAYER_KERNELS_H

#include "cpu_math.h"
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* Above this many elements a pass is split over PyTorch's OpenMP threads (same libgomp soname). */
#define PARALLEL_ELEMENTS (1 << 16)

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

#ifdef __AVX512F__
static inline __m512 load_bf16x16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* f32_to_bf16 for 16 lanes: round to nearest even, NaN stays NaN. */
static inline __m256i to_bf16x16(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                        _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1))));
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

static inline __m512 round_bf16x16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16x16(v)), 16));
}

static inline __mmask16 tail_mask(long remaining) {
    return remaining >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << remaining) - 1);
}
#endif

/* One row of `size` elements: residual_out = bf16(x + residual) (skipped when residual is NULL: the sum is x
 * itself); out = bf16(sum * (1 / sqrt(mean(sum^2) + eps)) * (weight + offset)). `out` may be `x` (in place). */
static inline void add_rms_norm_row(const uint16_t *x, const uint16_t *residual, const uint16_t *weight, uint16_t *out,
                                    uint16_t *residual_out, long size, float eps, float offset) {
    /* The normalised input: x itself, or the bf16 sum just written to residual_out. */
    const uint16_t *in = residual ? residual_out : x;
    float sum_sq = 0.f;
    long i = 0;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; i < size; i += 16) {
        const __mmask16 m = tail_mask(size - i);
        __m512 v = load_bf16x16(x + i, m);
        if (residual) {
            const __m256i summed = to_bf16x16(_mm512_add_ps(v, load_bf16x16(residual + i, m)));
            _mm256_mask_storeu_epi16(residual_out + i, m, summed);
            v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(summed), 16));
        }
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    sum_sq = _mm512_reduce_add_ps(acc);
#endif
    for (; i < size; i++) {
        float v = bf16_to_f32(x[i]);
        if (residual) {
            residual_out[i] = f32_to_bf16(v + bf16_to_f32(residual[i]));
            v = bf16_to_f32(residual_out[i]);
        }
        sum_sq += v * v;
    }
    const float scale = 1.f / sqrtf(sum_sq / (float)size + eps);
    i = 0;
#ifdef __AVX512F__
    for (; i < size; i += 16) {
        const __mmask16 m = tail_mask(size - i);
        const __m512 w = _mm512_add_ps(load_bf16x16(weight + i, m), _mm512_set1_ps(offset));
        const __m512 normed = _mm512_mul_ps(_mm512_mul_ps(load_bf16x16(in + i, m), _mm512_set1_ps(scale)), w);
        _mm256_mask_storeu_epi16(out + i, m, to_bf16x16(normed));
    }
#endif
    for (; i < size; i++)
        out[i] = f32_to_bf16((bf16_to_f32(in[i]) * scale) * (bf16_to_f32(weight[i]) + offset));
}

/* add_rms_norm_row over `rows` rows of `size` elements; residual and residual_out both given or both NULL. */
static void add_rms_norm_rows(const uint16_t *x, const uint16_t *residual, const uint16_t *weight, uint16_t *out,
                              uint16_t *residual_out, long rows, long size, float eps, float offset, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * size >= PARALLEL_ELEMENTS && threads > 1)
    for (long r = 0; r < rows; r++)
        add_rms_norm_row(x + r * size, residual ? residual + r * size : NULL, weight, out + r * size,
                         residual ? residual_out + r * size : NULL, size, eps, offset);
}

/* Qwen3's RMSNorm per head of queries or keys: `heads` heads of `head_dim` at the start of each of `rows` token
 * rows `row_stride` elements apart (a slice of the fused projection's output), each head a row of
 * add_rms_norm_row, written to rows `out_stride` apart (x itself, in place, with out_stride = row_stride). */
static void rms_norm_heads(const uint16_t *x, long rows, long row_stride, long heads, long head_dim,
                           const uint16_t *weight, uint16_t *out, long out_stride, float eps, float offset, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * heads * head_dim >= PARALLEL_ELEMENTS && threads > 1)
    for (long t = 0; t < rows; t++)
        for (long h = 0; h < heads; h++)
            add_rms_norm_row(x + t * row_stride + h * head_dim, NULL, weight, out + t * out_stride + h * head_dim, NULL,
                             head_dim, eps, offset);
}

/* y = bf16(y + bias) on `rows` rows of `size`: a linear's bias, added as PyTorch adds two bf16 tensors. */
static void add_bias_rows(uint16_t *y, const uint16_t *bias, long rows, long size) {
    for (long r = 0; r < rows; r++) {
        uint16_t *row = y + r * size;
        long i = 0;
#ifdef __AVX512F__
        for (; i < size; i += 16) {
            const __mmask16 m = tail_mask(size - i);
            _mm256_mask_storeu_epi16(row + i, m, to_bf16x16(_mm512_add_ps(load_bf16x16(row + i, m),
                                                                          load_bf16x16(bias + i, m))));
        }
#endif
        for (; i < size; i++) row[i] = f32_to_bf16(bf16_to_f32(row[i]) + bf16_to_f32(bias[i]));
    }
}

/* Rotate-half RoPE in place on `heads` heads of each token row (queries and keys side by side in the
 * fused projection's output): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, each product and the sum
 * rounded to bf16 as the reference's three bf16 tensor ops do. */
static void rotary_rows(uint16_t *qk, long rows, long row_stride, int heads, int head_dim, const int64_t *positions,
                        const uint16_t *cos, const uint16_t *sin, int threads) {
    const int half = head_dim / 2;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * heads * head_dim >= PARALLEL_ELEMENTS && threads > 1)
    for (long t = 0; t < rows; t++) {
        const uint16_t *c = cos + positions[t] * head_dim, *s = sin + positions[t] * head_dim;
        for (int h = 0; h < heads; h++) {
            uint16_t *x = qk + t * row_stride + (long)h * head_dim;
            int i = 0;
#ifdef __AVX512F__
            for (; i < half; i += 16) {
                const __mmask16 m = tail_mask(half - i);
                const __m512 x1 = load_bf16x16(x + i, m), x2 = load_bf16x16(x + i + half, m);
                const __m512 lo = _mm512_add_ps(round_bf16x16(_mm512_mul_ps(x1, load_bf16x16(c + i, m))),
                                                round_bf16x16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), load_bf16x16(s + i, m))));
                const __m512 hi = _mm512_add_ps(round_bf16x16(_mm512_mul_ps(x2, load_bf16x16(c + i + half, m))),
                                                round_bf16x16(_mm512_mul_ps(x1, load_bf16x16(s + i + half, m))));
                _mm256_mask_storeu_epi16(x + i, m, to_bf16x16(lo));
                _mm256_mask_storeu_epi16(x + i + half, m, to_bf16x16(hi));
            }
#endif
            for (; i < half; i++) {
                const float x1 = bf16_to_f32(x[i]), x2 = bf16_to_f32(x[i + half]);
                const float lo = round_bf16(x1 * bf16_to_f32(c[i])) + round_bf16(-x2 * bf16_to_f32(s[i]));
                const float hi = round_bf16(x2 * bf16_to_f32(c[i + half])) + round_bf16(x1 * bf16_to_f32(s[i + half]));
                x[i] = f32_to_bf16(lo);
                x[i + half] = f32_to_bf16(hi);
            }
        }
    }
}

/* out = bf16(bf16(silu(gate)) * up) with gate, up the two halves of each row of `gate_up`. */
static void silu_and_mul_rows(const uint16_t *gate_up, uint16_t *out, long rows, long size, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * size >= PARALLEL_ELEMENTS && threads > 1)
    for (long r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + r * 2 * size, *up = gate + size;
        uint16_t *o = out + r * size;
        long i = 0;
#ifdef __AVX512F__
        for (; i < size; i += 16) {
            const __mmask16 m = tail_mask(size - i);
            const __m512 g = load_bf16x16(gate + i, m);
            const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            _mm256_mask_storeu_epi16(o + i, m, to_bf16x16(_mm512_mul_ps(round_bf16x16(silu), load_bf16x16(up + i, m))));
        }
#endif
        for (; i < size; i++) {
            const float g = bf16_to_f32(gate[i]);
            o[i] = f32_to_bf16(round_bf16(g / (1.f + expf(-g))) * bf16_to_f32(up[i]));
        }
    }
}

#endif
