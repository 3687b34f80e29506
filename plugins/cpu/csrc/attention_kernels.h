/*
 * Decode attention over the paged KV cache, for the CPU backend.
 *
 * One query token per sequence; keys and values are read straight from the cache blocks the block
 * table names (no gather into a padded copy). Each (sequence, kv head) pair is one work item: the
 * query heads grouped under that kv head share every key and value load. Scores, softmax and the
 * weighted sum are in float32 whatever the storage type. Large batches are spread over PyTorch's
 * intra-op threads; paged_attention.c wraps this for Python, decode_stack.c calls it per layer.
 *
 * Layout: q, out (num_seqs, num_heads, head_dim); k_cache, v_cache (num_blocks, num_kv_heads,
 * block_size, head_dim): head-major inside a block, so one kv head's rows of a block are one contiguous
 * run the hardware prefetcher follows (interleaved heads read half as fast from DRAM);
 * block_tables (num_seqs, table_stride) int32; seq_lens int32.
 *
 * The cache may store another dtype than the queries' (`kv_dtype`): bf16 under float32 queries, or a
 * one-byte format (int8, fp8 e4m3 or e5m2, tokenmill.kv_cache_dtype), each row then head_dim codes
 * followed by its bf16 scale (head_dim + 2 bytes). Codes are converted to float32 as they are loaded;
 * a key row's scale multiplies its converted row once, a value row's scale its softmax weight.
 *
 * Where the CPU has AMX (amx_tiles.h), bf16 caches of head size 64 or 128 take the tiles (`attend_amx`): the same
 * arithmetic with the products on the tiles, 1.2-1.6x faster over cold caches at 3-7 query heads per kv head.
 * There consecutive rows of one sequence (a prompt attended row by row) share a pass (`row_runs`).
 */
#ifndef TOKENMILL_ATTENTION_KERNELS_H
#define TOKENMILL_ATTENTION_KERNELS_H

#include "amx_tiles.h"
#include "cpu_math.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { DTYPE_BF16 = 0, DTYPE_F32 = 1, DTYPE_INT8 = 2, DTYPE_FP8_E4M3 = 3, DTYPE_FP8_E5M2 = 4 };
#define IS_QUANTIZED(dtype) ((dtype) >= DTYPE_INT8)
#define SCALE_BYTES 2 /* a quantized row's bf16 scale, after its codes */
#define MAX_GROUP 32
#define MAX_HEAD_DIM 256

typedef struct {
    const void *q, *k_cache, *v_cache;
    const int32_t *block_tables, *seq_lens;
    void *out;
    long table_stride;
    int num_heads, num_kv_heads, head_dim, block_size, window, dtype;
    float scale;
    int kv_dtype; /* the cache's storage: dtype, bf16, or a one-byte format */
} Job;

/* Largest magnitude of a one-byte format. */
static inline float quantized_max(int kv_dtype) {
    return kv_dtype == DTYPE_INT8 ? 127.f : kv_dtype == DTYPE_FP8_E4M3 ? 448.f : 57344.f;
}

/* The value of an fp8 code (e4m3: bias 7, 3 mantissa bits, no infinities; e5m2: bias 15, 2 bits). */
static inline float fp8_to_f32(uint8_t code, int kv_dtype) {
    const int m_bits = kv_dtype == DTYPE_FP8_E4M3 ? 3 : 2, bias = kv_dtype == DTYPE_FP8_E4M3 ? 7 : 15;
    const int exponent = (code & 0x7F) >> m_bits, mantissa = code & ((1 << m_bits) - 1);
    const float magnitude = exponent ? ldexpf(1.f + (float)mantissa / (1 << m_bits), exponent - bias)
                                     : ldexpf((float)mantissa / (1 << m_bits), 1 - bias);
    return code & 0x80 ? -magnitude : magnitude;
}

/* |x| <= the format's largest value, to the nearest fp8 code, ties to even (as PyTorch converts). */
static inline uint8_t f32_to_fp8(float x, int kv_dtype) {
    const int m_bits = kv_dtype == DTYPE_FP8_E4M3 ? 3 : 2, bias = kv_dtype == DTYPE_FP8_E4M3 ? 7 : 15;
    uint32_t bits;
    memcpy(&bits, &x, 4);
    const uint8_t sign = (uint8_t)((bits >> 24) & 0x80);
    bits &= 0x7FFFFFFF;
    float magnitude;
    memcpy(&magnitude, &bits, 4);
    uint32_t code;
    if (magnitude < ldexpf(1.f, 1 - bias)) { /* subnormal: a count of the smallest step, 2^(1 - bias - m_bits) */
        code = (uint32_t)nearbyintf(ldexpf(magnitude, bias - 1 + m_bits));
    } else { /* drop the low mantissa bits rounding to even; a carry moves into the exponent */
        bits += (1u << (22 - m_bits)) - 1 + ((bits >> (23 - m_bits)) & 1);
        code = (((bits >> 23) - 127 + bias) << m_bits) | ((bits >> (23 - m_bits)) & ((1u << m_bits) - 1));
    }
    return sign | (uint8_t)code;
}

/* One bf16 row of n values as n one-byte codes and its bf16 scale (largest magnitude / format's largest):
 * the rounding of tokenmill.kv_cache_dtype.quantize_rows, step for step, so both write the same bytes. */
static inline void quantize_row(const uint16_t *src, int n, int kv_dtype, uint8_t *dst) {
    const float max_code = quantized_max(kv_dtype);
    float amax = 0.f;
    for (int i = 0; i < n; i++) amax = fmaxf(amax, fabsf(bf16_to_f32(src[i])));
    uint16_t scale_bits = f32_to_bf16(amax / max_code);
    if (bf16_to_f32(scale_bits) == 0.f) scale_bits = f32_to_bf16(1.f); /* an all-zero row: any scale */
    const float scale = bf16_to_f32(scale_bits);
    for (int i = 0; i < n; i++) {
        const float v = fminf(fmaxf(bf16_to_f32(src[i]) / scale, -max_code), max_code);
        dst[i] = kv_dtype == DTYPE_INT8 ? (uint8_t)(int8_t)nearbyintf(v) : f32_to_fp8(v, kv_dtype);
    }
    memcpy(dst + n, &scale_bits, SCALE_BYTES);
}

static inline const uint8_t *quantized_row(const Job *job, const void *cache, long row) {
    return (const uint8_t *)cache + row * (job->head_dim + SCALE_BYTES);
}

static inline float quantized_row_scale(const Job *job, const void *cache, long row) {
    uint16_t bits;
    memcpy(&bits, quantized_row(job, cache, row) + job->head_dim, SCALE_BYTES);
    return bf16_to_f32(bits);
}

/* Per-thread scratch: the item's cache rows, and its scores (group x span). */
typedef struct {
    long *rows;
    float *scores;
    uint16_t *weights; /* the scores as two bf16 (high part, then the rest), each group's row padded to even */
    long capacity; /* positions */
    int group; /* query rows of scores per position */
} Scratch;

static int reserve(Scratch *s, long span, int group) {
    if (span <= s->capacity && group <= s->group) return 1;
    free(s->rows);
    free(s->scores);
    free(s->weights);
    s->capacity = span * 2;
    s->group = group;
    s->rows = (long *)malloc((size_t)s->capacity * sizeof(long));
    s->scores = (float *)malloc((size_t)s->capacity * group * sizeof(float));
    /* each group's row padded to a whole 32 positions, the tile kernel's step */
    s->weights = (uint16_t *)malloc((size_t)(s->capacity + 32) * group * 2 * sizeof(uint16_t));
    return s->rows && s->scores && s->weights;
}

static inline void load_row(const void *base, long index, int dtype, int n, float *dst) {
    if (dtype == DTYPE_BF16) {
        const uint16_t *src = (const uint16_t *)base + index;
        for (int i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
    } else {
        memcpy(dst, (const float *)base + index, (size_t)n * sizeof(float));
    }
}

static inline void store_row(void *base, long index, int dtype, int n, const float *src, float scale) {
    if (dtype == DTYPE_BF16) {
        uint16_t *dst = (uint16_t *)base + index;
        for (int i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i] * scale);
    } else {
        float *dst = (float *)base + index;
        for (int i = 0; i < n; i++) dst[i] = src[i] * scale;
    }
}

/* Cache row `row` as head_dim float32 values, scale applied. */
static inline void load_cache_row(const Job *job, const void *cache, long row, float *dst) {
    const int n = job->head_dim;
    if (!IS_QUANTIZED(job->kv_dtype)) {
        load_row(cache, row * n, job->kv_dtype, n, dst);
        return;
    }
    const uint8_t *codes = quantized_row(job, cache, row);
    const float scale = quantized_row_scale(job, cache, row);
    for (int i = 0; i < n; i++)
        dst[i] = scale * (job->kv_dtype == DTYPE_INT8 ? (float)(int8_t)codes[i] : fp8_to_f32(codes[i], job->kv_dtype));
}

/* Cache row (position first + i, kv_head) for i < span, walking the block table without dividing per position. */
static void item_rows(const Job *job, const int32_t *table, int first, int span, int kv_head, long *rows) {
    const int bs = job->block_size;
    int block = first / bs, offset = first % bs;
    for (int i = 0; i < span; i++) {
        rows[i] = ((long)table[block] * job->num_kv_heads + kv_head) * bs + offset;
        if (++offset == bs) {
            offset = 0;
            block++;
        }
    }
}

#ifdef __AVX512F__
/* 16 consecutive elements of a row as float32 lanes. */
static inline __m512 load16(const void *base, long index, int dtype) {
    if (dtype == DTYPE_BF16) {
        __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + index));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    return _mm512_loadu_ps((const float *)base + index);
}

/* 16 one-byte codes as float32 lanes, without the row's scale. An fp8 code moved into a float16's fields
 * (e5m2: its top byte; e4m3: sign, then exponent and mantissa one bit lower) converts in hardware; e4m3's
 * exponent bias (7, float16's 15) leaves it 2^8 too small, which `code_factor` puts back into the scale. */
static inline __m512 load_codes16(const uint8_t *codes, int kv_dtype) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)codes);
    if (kv_dtype == DTYPE_INT8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
    const __m256i wide = _mm256_cvtepu8_epi16(raw);
    if (kv_dtype == DTYPE_FP8_E5M2) return _mm512_cvtph_ps(_mm256_slli_epi16(wide, 8));
    const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(wide, _mm256_set1_epi16(0x80)), 8);
    const __m256i rest = _mm256_slli_epi16(_mm256_and_si256(wide, _mm256_set1_epi16(0x7F)), 7);
    return _mm512_cvtph_ps(_mm256_or_si256(sign, rest));
}

static inline float code_factor(int kv_dtype) { return kv_dtype == DTYPE_FP8_E4M3 ? 256.f : 1.f; }

/* Lanes 16j.. of cache row `row` as float32; a quantized row without its scale (`row_factor`). */
static inline __m512 load_cache16(const Job *job, const void *cache, long row, int j, const int quantized) {
    if (!quantized) return load16(cache, row * job->head_dim + 16 * j, job->kv_dtype);
    return load_codes16(quantized_row(job, cache, row) + 16 * j, job->kv_dtype);
}

/* What row `row`'s loaded lanes are multiplied by: its scale (with the fp8 code factor), 1 unquantized. */
static inline float row_factor(const Job *job, const void *cache, long row, const int quantized) {
    return quantized ? quantized_row_scale(job, cache, row) * code_factor(job->kv_dtype) : 1.f;
}

#define MAX_VECS (MAX_HEAD_DIM / 16)
#define CHUNK 16
#define PREFETCH_AHEAD 48 /* value rows requested this many positions ahead (16 measured slower) */

/* Lane i of the result is the sum of the 16 lanes of r[i]: a transpose-and-add butterfly, about three
 * instructions per vector instead of a full horizontal reduction each. */
static inline __m512 sum_lanes16(const __m512 r[16]) {
    __m512 pairs[8], quads[4];
    for (int k = 0; k < 8; k++)
        pairs[k] = _mm512_add_ps(_mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]), _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]));
    for (int k = 0; k < 4; k++) {
        const __m512d a = _mm512_castps_pd(pairs[2 * k]), b = _mm512_castps_pd(pairs[2 * k + 1]);
        quads[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    /* quads[k], 128-bit lane L: the lane-L partial sums of r[4k .. 4k+3]; add the four lanes up. */
    const __m512 lo = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88), _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
    const __m512 hi = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88), _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(lo, hi, 0x88), _mm512_shuffle_f32x4(lo, hi, 0xDD));
}

/* s[i] = exp(s[i] - max) in place; returns their sum. */
static inline float softmax_numerators(float *s, int span, float max) {
    const __m512 m = _mm512_set1_ps(max);
    __m512 sum = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= span; i += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), m));
        _mm512_storeu_ps(s + i, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (i < span) {
        const __mmask16 tail = (__mmask16)((1u << (span - i)) - 1);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + i), m));
        _mm512_mask_storeu_ps(s + i, tail, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
    }
    return _mm512_reduce_add_ps(sum);
}

/* One (sequence, kv head) work item, vectorised along the head dimension (head_dim % 16 == 0). Keys are
 * taken 16 positions at a time, converted to float32 once and shared by the query heads of the group.
 * `quantized` is a constant in each instantiation, so the unquantized one is the code it always was. */
static inline __attribute__((always_inline)) void attend_avx512(const Job *job, long seq, int kv_head,
                                                                const long *rows, float *scores, int span,
                                                                const int quantized) {
    const int D = job->head_dim, G = job->num_heads / job->num_kv_heads, V = D / 16;
    __m512 q[MAX_GROUP][MAX_VECS], acc[MAX_GROUP][MAX_VECS], max_score[MAX_GROUP];
    float keys[CHUNK * MAX_HEAD_DIM];
    for (int g = 0; g < G; g++) {
        const long base = (seq * job->num_heads + (long)kv_head * G + g) * D;
        for (int j = 0; j < V; j++) q[g][j] = _mm512_mul_ps(load16(job->q, base + 16 * j, job->dtype),
                                                            _mm512_set1_ps(job->scale));
        max_score[g] = _mm512_set1_ps(-INFINITY);
    }
    for (int c = 0; c < span; c += CHUNK) {
        const int n = span - c < CHUNK ? span - c : CHUNK;
        const __mmask16 valid = (__mmask16)((1u << n) - 1);
        for (int i = 0; i < n; i++) {
            const __m512 factor = _mm512_set1_ps(row_factor(job, job->k_cache, rows[c + i], quantized));
            for (int j = 0; j < V; j++) {
                const __m512 k = load_cache16(job, job->k_cache, rows[c + i], j, quantized);
                _mm512_storeu_ps(keys + i * D + 16 * j, quantized ? _mm512_mul_ps(k, factor) : k);
            }
        }
        for (int g = 0; g < G; g++) {
            __m512 dots[CHUNK];
            for (int i = 0; i < CHUNK; i++) {
                __m512 dot = _mm512_setzero_ps();
                if (i < n)
                    for (int j = 0; j < V; j++) dot = _mm512_fmadd_ps(q[g][j], _mm512_loadu_ps(keys + i * D + 16 * j), dot);
                dots[i] = dot;
            }
            const __m512 s = sum_lanes16(dots);
            _mm512_mask_storeu_ps(scores + (long)g * span + c, valid, s);
            max_score[g] = _mm512_mask_max_ps(max_score[g], valid, max_score[g], s);
        }
    }
    float total[MAX_GROUP];
    for (int g = 0; g < G; g++) {
        total[g] = softmax_numerators(scores + (long)g * span, span, _mm512_reduce_max_ps(max_score[g]));
        for (int j = 0; j < V; j++) acc[g][j] = _mm512_setzero_ps();
    }
    for (int i = 0; i < span; i++) {
        __m512 v[MAX_VECS];
        for (int j = 0; j < V; j++) v[j] = load_cache16(job, job->v_cache, rows[i], j, quantized);
        const float factor = row_factor(job, job->v_cache, rows[i], quantized);
        for (int g = 0; g < G; g++) {
            const __m512 w = _mm512_set1_ps(quantized ? scores[(long)g * span + i] * factor : scores[(long)g * span + i]);
            for (int j = 0; j < V; j++) acc[g][j] = _mm512_fmadd_ps(w, v[j], acc[g][j]);
        }
    }
    for (int g = 0; g < G; g++) {
        float lanes[MAX_HEAD_DIM];
        for (int j = 0; j < V; j++) _mm512_storeu_ps(lanes + 16 * j, acc[g][j]);
        store_row(job->out, (seq * job->num_heads + (long)kv_head * G + g) * D, job->dtype, D, lanes, 1.f / total[g]);
    }
}

static void attend_item_avx512(const Job *job, long seq, int kv_head, const long *rows, float *scores, int span) {
    attend_avx512(job, seq, kv_head, rows, scores, span, 0);
}

static void attend_item_avx512_quantized(const Job *job, long seq, int kv_head, const long *rows, float *scores,
                                         int span) {
    attend_avx512(job, seq, kv_head, rows, scores, span, 1);
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
/* attend_avx512's arithmetic in 8 lanes, for CPUs with AVX2 alone (bf16 or float32 caches; one-byte caches
 * take the portable path). */
#define HAVE_AVX2_ATTENTION 1
#define MAX_VECS8 (MAX_HEAD_DIM / 8)
#define CHUNK8 8

/* 8 consecutive elements of a row as float32 lanes. */
static inline __m256 load8(const void *base, long index, int dtype) {
    if (dtype == DTYPE_BF16) {
        const __m128i raw = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + index));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    }
    return _mm256_loadu_ps((const float *)base + index);
}

/* Lane i of the result is the sum of the 8 lanes of r[i]. */
static inline __m256 sum_lanes8(const __m256 r[8]) {
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(r[0], r[1]), _mm256_hadd_ps(r[2], r[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(r[4], r[5]), _mm256_hadd_ps(r[6], r[7]));
    /* a: per 128-bit half, the partial sums of r[0..3]; b: of r[4..7]. */
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

/* s[i] = exp(s[i] - max) in place; returns their sum. */
static inline float softmax_numerators8(float *s, int span, float max) {
    const __m256 m = _mm256_set1_ps(max);
    __m256 sum = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= span; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), m));
        _mm256_storeu_ps(s + i, e);
        sum = _mm256_add_ps(sum, e);
    }
    float total = reduce_add8(sum);
    for (; i < span; i++) {
        s[i] = expf(s[i] - max);
        total += s[i];
    }
    return total;
}

/* One (sequence, kv head) work item, vectorised along the head dimension (head_dim % 8 == 0): keys 8
 * positions at a time, converted to float32 once and shared by the group's query heads. */
static void attend_item_avx2(const Job *job, long seq, int kv_head, const long *rows, float *scores, int span) {
    const int D = job->head_dim, G = job->num_heads / job->num_kv_heads, V = D / 8;
    __m256 q[MAX_GROUP][MAX_VECS8], acc[MAX_GROUP][MAX_VECS8];
    float max_score[MAX_GROUP], total[MAX_GROUP], keys[CHUNK8 * MAX_HEAD_DIM];
    for (int g = 0; g < G; g++) {
        const long base = (seq * job->num_heads + (long)kv_head * G + g) * D;
        for (int j = 0; j < V; j++)
            q[g][j] = _mm256_mul_ps(load8(job->q, base + 8 * j, job->dtype), _mm256_set1_ps(job->scale));
        max_score[g] = -INFINITY;
    }
    for (int c = 0; c < span; c += CHUNK8) {
        const int n = span - c < CHUNK8 ? span - c : CHUNK8;
        for (int i = 0; i < CHUNK8; i++) /* a short last chunk's missing keys are zeros, their lanes unused */
            for (int j = 0; j < V; j++)
                _mm256_storeu_ps(keys + i * D + 8 * j, i < n ? load8(job->k_cache, rows[c + i] * D + 8 * j, job->kv_dtype)
                                                             : _mm256_setzero_ps());
        for (int g = 0; g < G; g++) {
            /* Eight independent chains, one per key, each summing over j in order. */
            __m256 dots[CHUNK8];
            for (int i = 0; i < CHUNK8; i++) dots[i] = _mm256_setzero_ps();
            for (int j = 0; j < V; j++)
                for (int i = 0; i < CHUNK8; i++)
                    dots[i] = _mm256_fmadd_ps(q[g][j], _mm256_loadu_ps(keys + i * D + 8 * j), dots[i]);
            float s[CHUNK8];
            _mm256_storeu_ps(s, sum_lanes8(dots));
            for (int i = 0; i < n; i++) {
                scores[(long)g * span + c + i] = s[i];
                max_score[g] = s[i] > max_score[g] ? s[i] : max_score[g];
            }
        }
    }
    for (int g = 0; g < G; g++) {
        total[g] = softmax_numerators8(scores + (long)g * span, span, max_score[g]);
        for (int j = 0; j < V; j++) acc[g][j] = _mm256_setzero_ps();
    }
    for (int i = 0; i < span; i++) {
        __m256 v[MAX_VECS8];
        for (int j = 0; j < V; j++) v[j] = load8(job->v_cache, rows[i] * D + 8 * j, job->kv_dtype);
        for (int g = 0; g < G; g++) {
            const __m256 w = _mm256_set1_ps(scores[(long)g * span + i]);
            for (int j = 0; j < V; j++) acc[g][j] = _mm256_fmadd_ps(w, v[j], acc[g][j]);
        }
    }
    for (int g = 0; g < G; g++) {
        float lanes[MAX_HEAD_DIM];
        for (int j = 0; j < V; j++) _mm256_storeu_ps(lanes + 8 * j, acc[g][j]);
        store_row(job->out, (seq * job->num_heads + (long)kv_head * G + g) * D, job->dtype, D, lanes, 1.f / total[g]);
    }
}
#else
#define HAVE_AVX2_ATTENTION 0
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* Where word w (32 elements) of cache row `row` starts: bf16 elements, or one-byte codes. */
static inline const char *bf16_word_address(const Job *job, const void *cache, long row, int w, const int quantized) {
    if (quantized) return (const char *)(quantized_row(job, cache, row) + 32 * w);
    return (const char *)((const uint16_t *)cache + row * job->head_dim + 32 * w);
}

/* Word w of cache row `row` as 32 bf16 values; one-byte codes converted exactly (int8 and fp8 values have
 * at most 8 significant bits), without the row's scale (`row_factor`). */
static inline __m512bh load_bf16_word(const Job *job, const void *cache, long row, int w, const int quantized) {
    if (!quantized) return (__m512bh)_mm512_loadu_si512(bf16_word_address(job, cache, row, w, 0));
    const uint8_t *codes = (const uint8_t *)bf16_word_address(job, cache, row, w, 1);
    return _mm512_cvtne2ps_pbh(load_codes16(codes + 16, job->kv_dtype), load_codes16(codes, job->kv_dtype));
}

/* Softmax numerators s[0 .. span-1] as two bf16 each: w its rounding, rest the rounding of what is left. */
static inline void split_weights(const float *s, int span, uint16_t *w, uint16_t *rest) {
    for (int i = 0; i < span; i += 16) {
        const __mmask16 tail = span - i >= 16 ? 0xFFFF : (__mmask16)((1u << (span - i)) - 1);
        const __m512 value = _mm512_maskz_loadu_ps(tail, s + i);
        const __m256i high = (__m256i)_mm512_cvtneps_pbh(value);
        const __m512 high_value = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(high), 16));
        _mm256_mask_storeu_epi16(w + i, tail, high);
        _mm256_mask_storeu_epi16(rest + i, tail, (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(value, high_value)));
    }
}

/* bf16 caches on CPUs with AVX512-BF16: dot products straight on the stored bf16 pairs (vdpbf16ps), no
 * conversion to float32. Scores: 32 key dims per instruction, 16 positions summed at once. Weighted sum:
 * two positions per instruction, their value rows interleaved; each softmax numerator is split into two
 * bf16 (its rounding and the rounding of the rest), so the weights keep ~16 bits where one bf16 would
 * keep 8: one more vdpbf16ps per value pair for attention as exact as PyTorch's flash kernel (prompts go
 * row by row too, attention.py's `row_context_limit`). G query heads per kv head and D dims are compile-time
 * constants in each instantiation, so accumulators stay in registers.
 * One-byte caches (`quantized`, a constant too) take the same path: their codes convert to bf16 exactly,
 * a key row's scale multiplies its score and a value row's scale its weight before that is rounded. */
static inline __attribute__((always_inline)) void attend_bf16(const Job *job, long seq, int kv_head,
                                                              const long *rows, float *scores,
                                                              uint16_t *weights, int span, const int G,
                                                              const int D, const int quantized) {
    const int W = D / 32; /* 512-bit words per row */
    const void *k_cache = job->k_cache, *v_cache = job->v_cache;
    const long q_base = (seq * job->num_heads + (long)kv_head * G) * D;
    __m512bh q[MAX_GROUP][MAX_HEAD_DIM / 32];
    __m512 max_score[MAX_GROUP];
    for (int g = 0; g < G; g++) {
        for (int w = 0; w < W; w++)
            q[g][w] = (__m512bh)_mm512_loadu_si512((const uint16_t *)job->q + q_base + g * D + 32 * w);
        max_score[g] = _mm512_set1_ps(-INFINITY);
    }
    const __m512 scale = _mm512_set1_ps(job->scale);
    /* Rows are scattered over blocks, too irregular for the hardware prefetcher: keys are asked for two
     * chunks ahead of the one computed (the first two at once), and each chunk's values into L2 while its
     * keys are computed, so the weighted sum does not start on a cold read either. */
    for (int i = 0; i < span && i < 2 * CHUNK; i++)
        for (int w = 0; w < W; w++) _mm_prefetch(bf16_word_address(job, k_cache, rows[i], w, quantized), _MM_HINT_T0);
    for (int c = 0; c < span; c += CHUNK) {
        const int n = span - c < CHUNK ? span - c : CHUNK;
        const __mmask16 valid = (__mmask16)((1u << n) - 1);
        __m512 dots[MAX_GROUP][CHUNK];
        for (int i = c + 2 * CHUNK; i < span && i < c + 3 * CHUNK; i++)
            for (int w = 0; w < W; w++) _mm_prefetch(bf16_word_address(job, k_cache, rows[i], w, quantized), _MM_HINT_T0);
        for (int i = c; i < span && i < c + CHUNK; i++)
            for (int w = 0; w < W; w++) _mm_prefetch(bf16_word_address(job, v_cache, rows[i], w, quantized), _MM_HINT_T1);
        float key_factors[CHUNK];
        if (quantized)
            for (int i = 0; i < CHUNK; i++) key_factors[i] = i < n ? row_factor(job, k_cache, rows[c + i], 1) : 0.f;
        for (int i = 0; i < CHUNK; i++) {
            __m512bh k[MAX_HEAD_DIM / 32];
            for (int w = 0; w < W; w++)
                k[w] = i < n ? load_bf16_word(job, k_cache, rows[c + i], w, quantized) : (__m512bh)_mm512_setzero_si512();
            for (int g = 0; g < G; g++) {
                __m512 dot = _mm512_setzero_ps();
                for (int w = 0; w < W; w++) dot = _mm512_dpbf16_ps(dot, q[g][w], k[w]);
                dots[g][i] = dot;
            }
        }
        for (int g = 0; g < G; g++) {
            __m512 s = _mm512_mul_ps(sum_lanes16(dots[g]), scale);
            if (quantized) s = _mm512_mul_ps(s, _mm512_loadu_ps(key_factors));
            _mm512_mask_storeu_ps(scores + (long)g * span + c, valid, s);
            max_score[g] = _mm512_mask_max_ps(max_score[g], valid, max_score[g], s);
        }
    }
    const int pairs = (span + 1) / 2, padded = 2 * pairs;
    float total[MAX_GROUP];
    uint16_t *const rests = weights + (long)G * padded; /* the second bf16 of each weight */
    for (int g = 0; g < G; g++) {
        float *s = scores + (long)g * span;
        uint16_t *w = weights + (long)g * padded, *rest = rests + (long)g * padded;
        total[g] = softmax_numerators(s, span, _mm512_reduce_max_ps(max_score[g]));
        if (quantized) /* each weight times its value row's scale, before rounding: the total stays unscaled */
            for (int i = 0; i < span; i++) s[i] *= row_factor(job, v_cache, rows[i], 1);
        split_weights(s, span, w, rest);
        if (span % 2) w[span] = rest[span] = 0;
    }
    /* acc[g][2w] holds dims 8L..8L+3 of word w's 128-bit lanes L, acc[g][2w+1] dims 8L+4..8L+7. */
    __m512 acc[MAX_GROUP][MAX_HEAD_DIM / 16];
    for (int g = 0; g < G; g++)
        for (int j = 0; j < 2 * W; j++) acc[g][j] = _mm512_setzero_ps();
    for (int p = 0; p < pairs; p++) {
        const int i = 2 * p;
        const int has_second = i + 1 < span;
        if (i + PREFETCH_AHEAD < span)
            for (int w = 0; w < W; w++) {
                _mm_prefetch(bf16_word_address(job, v_cache, rows[i + PREFETCH_AHEAD], w, quantized), _MM_HINT_T0);
                if (i + PREFETCH_AHEAD + 1 < span)
                    _mm_prefetch(bf16_word_address(job, v_cache, rows[i + PREFETCH_AHEAD + 1], w, quantized), _MM_HINT_T0);
            }
        for (int w = 0; w < W; w++) {
            const __m512i a = (__m512i)load_bf16_word(job, v_cache, rows[i], w, quantized);
            const __m512i b = has_second ? (__m512i)load_bf16_word(job, v_cache, rows[i + 1], w, quantized) : _mm512_setzero_si512();
            const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, b), hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
            for (int g = 0; g < G; g++) {
                uint32_t pair, rest_pair;
                memcpy(&pair, weights + (long)g * padded + i, sizeof pair);
                memcpy(&rest_pair, rests + (long)g * padded + i, sizeof rest_pair);
                const __m512bh weight = (__m512bh)_mm512_set1_epi32((int)pair);
                const __m512bh rest = (__m512bh)_mm512_set1_epi32((int)rest_pair);
                acc[g][2 * w] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[g][2 * w], lo, weight), lo, rest);
                acc[g][2 * w + 1] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[g][2 * w + 1], hi, weight), hi, rest);
            }
        }
    }
    for (int g = 0; g < G; g++) {
        float lanes[MAX_HEAD_DIM], ordered[MAX_HEAD_DIM];
        for (int j = 0; j < 2 * W; j++) _mm512_storeu_ps(lanes + 16 * j, acc[g][j]);
        for (int w = 0; w < W; w++)
            for (int lane = 0; lane < 4; lane++)
                for (int m = 0; m < 4; m++) {
                    ordered[32 * w + 8 * lane + m] = lanes[32 * w + 4 * lane + m];
                    ordered[32 * w + 8 * lane + 4 + m] = lanes[32 * w + 16 + 4 * lane + m];
                }
        store_row(job->out, q_base + g * D, DTYPE_BF16, D, ordered, 1.f / total[g]);
    }
}

/* The shapes of common models get their own instantiation, bf16 and one-byte caches apart; returns 0 for
 * any other shape. */
static int attend_item_bf16(const Job *job, long seq, int kv_head, const long *rows, float *scores,
                            uint16_t *weights, int span) {
    const int G = job->num_heads / job->num_kv_heads;
#define SHAPE(g, d)                                                                                      \
    if (G == g && job->head_dim == d) {                                                                  \
        if (IS_QUANTIZED(job->kv_dtype)) attend_bf16(job, seq, kv_head, rows, scores, weights, span, g, d, 1); \
        else attend_bf16(job, seq, kv_head, rows, scores, weights, span, g, d, 0);                       \
        return 1;                                                                                        \
    }
    SHAPE(1, 64) SHAPE(2, 64) SHAPE(3, 64) SHAPE(4, 64) SHAPE(5, 64) SHAPE(6, 64) SHAPE(7, 64) SHAPE(8, 64)
    SHAPE(1, 128) SHAPE(2, 128) SHAPE(3, 128) SHAPE(4, 128) SHAPE(5, 128) SHAPE(6, 128) SHAPE(7, 128) SHAPE(8, 128)
#undef SHAPE
    return 0;
}
#endif

#if HAVE_AMX_TILES
#define AMX_MAX_DIM 128 /* head sizes the tile kernel takes: 64 and 128 */
#define AMX_MAX_GROUP AMX_TILE_ROWS /* query heads per kv head: rows of a tile */
#define AMX_VALUE_STEP 32 /* positions per step of the weighted sum: an A tile's row of bf16 weights */
#define AMX_VALUE_DIMS 64 /* dims per pass of the weighted sum: four accumulator tiles of 16 */

/* Scores: tile 0 accumulates 16 positions x G query heads (float32); 1 and 4 take turns holding 32 dims of the
 * 16 positions' keys (the cache rows as they are stored); 2, 3 (and for head size 128, 5 and 6) the query heads'
 * dims 0-31, 32-63 (64-95, 96-127) as B tiles, 16 dim pairs x G heads. */
static inline void amx_attention_scores_config(int G, int D) {
    AmxTileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    amx_shape(&cfg, 0, AMX_TILE_ROWS, 4 * G);
    amx_shape(&cfg, 1, AMX_TILE_ROWS, 64);
    amx_shape(&cfg, 4, AMX_TILE_ROWS, 64);
    amx_shape(&cfg, 2, AMX_TILE_ROWS, 4 * G);
    amx_shape(&cfg, 3, AMX_TILE_ROWS, 4 * G);
    if (D == 128) {
        amx_shape(&cfg, 5, AMX_TILE_ROWS, 4 * G);
        amx_shape(&cfg, 6, AMX_TILE_ROWS, 4 * G);
    }
    _tile_loadconfig(&cfg);
}

/* Weighted sum: tiles 0-3 accumulate G heads x 16 dims each (64 dims a pass); 4 and 5 hold the weights' two
 * bf16 parts, G heads x 32 positions; 6 and 7 values as B tiles, 16 position pairs x 16 dims x 2. */
static inline void amx_attention_values_config(int G) {
    AmxTileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 6; t++) amx_shape(&cfg, t, G, 64);
    amx_shape(&cfg, 6, AMX_TILE_ROWS, 64);
    amx_shape(&cfg, 7, AMX_TILE_ROWS, 64);
    _tile_loadconfig(&cfg);
}

/* Keys of positions c .. c+n-1 as 16 rows D apart: the cache block itself when they are one run of it, else
 * copied into `gathered` (rows past n left as they are: their scores are never read). */
static inline const uint16_t *amx_key_rows(const Job *job, const long *rows, int c, int n, uint16_t *gathered) {
    const uint16_t *cache = (const uint16_t *)job->k_cache;
    const int D = job->head_dim;
    if (n == CHUNK && rows[c + CHUNK - 1] == rows[c] + CHUNK - 1) return cache + rows[c] * D;
    for (int i = 0; i < n; i++) memcpy(gathered + i * D, cache + rows[c + i] * D, (size_t)D * 2);
    return gathered;
}

/* Dims first .. first+63 of the values of positions c .. c+31 (zero past the span) as four B tiles: tile j holds
 * dims first+16j .. first+16j+15 of each position pair, position 2p's value of a dim beside position 2p+1's, the
 * pairs tdpbf16ps multiplies by a weight pair. */
static inline void amx_value_tiles(const Job *job, const long *rows, int c, int span, int first, uint16_t *tiles) {
    const uint16_t *cache = (const uint16_t *)job->v_cache + first;
    const int D = job->head_dim;
    const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                         37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
    for (int p = 0; p < AMX_TILE_ROWS; p++) {
        const int i = c + 2 * p;
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, b0 = a0, b1 = a0;
        if (i < span) {
            a0 = _mm512_loadu_si512(cache + rows[i] * D);
            a1 = _mm512_loadu_si512(cache + rows[i] * D + 32);
        }
        if (i + 1 < span) {
            b0 = _mm512_loadu_si512(cache + rows[i + 1] * D);
            b1 = _mm512_loadu_si512(cache + rows[i + 1] * D + 32);
        }
        _mm512_store_si512(tiles + 0 * 512 + p * 32, _mm512_permutex2var_epi16(a0, low, b0));
        _mm512_store_si512(tiles + 1 * 512 + p * 32, _mm512_permutex2var_epi16(a0, high, b0));
        _mm512_store_si512(tiles + 2 * 512 + p * 32, _mm512_permutex2var_epi16(a1, low, b1));
        _mm512_store_si512(tiles + 3 * 512 + p * 32, _mm512_permutex2var_epi16(a1, high, b1));
    }
}

/* r[i] = row i of a 16 x 16 float32 matrix; afterwards r[j] is its column j. */
static inline void transpose16_ps(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xDD);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
    }
}

/* Columns of one tile pass: `rows` consecutive query rows of one sequence (prompt tokens or draft tokens
 * attended row by row, each seeing the positions up to its own) times the G query heads of one kv head. */
typedef struct {
    const uint16_t *q[AMX_MAX_GROUP]; /* each column's query vector */
    long out[AMX_MAX_GROUP]; /* each column's output offset */
    int span[AMX_MAX_GROUP]; /* positions each column attends */
    int count, longest;
} AmxColumns;

static inline void amx_columns(const Job *job, long first_row, int rows, int kv_head, int first, AmxColumns *cols) {
    const int G = job->num_heads / job->num_kv_heads, D = job->head_dim;
    cols->count = rows * G;
    cols->longest = 0;
    for (int t = 0; t < rows; t++)
        for (int g = 0; g < G; g++) {
            const int col = t * G + g;
            cols->out[col] = ((first_row + t) * job->num_heads + (long)kv_head * G + g) * D;
            cols->q[col] = (const uint16_t *)job->q + cols->out[col];
            cols->span[col] = job->seq_lens[first_row + t] - first;
            if (cols->span[col] > cols->longest) cols->longest = cols->span[col];
        }
}

/* bf16 caches of head size 64 or 128 on AMX tiles, up to 16 columns (query rows x heads, AmxColumns) per pass:
 * the same arithmetic as attend_bf16 (bf16 products summed in float32, float32 softmax, each weight as two
 * bf16), with the products on the tiles. Scores are keys x queries, so a cache block's keys load as an A tile
 * where they lie; the weighted sum is weights x values, the values interleaved in pairs as B tiles, 64 dims a
 * pass. A column's own result does not depend on the others beside it: a score tile's element is its own dot
 * product, positions past a column's span are left out of its softmax and weigh exactly zero. So a prompt's
 * rows taken together equal each taken alone, and each a one-token decode at its position. `rows` are the
 * cache rows of the longest column's span (the others' are a prefix of it). */
static void attend_amx(const Job *job, const AmxColumns *cols, const long *rows, float *scores, uint16_t *weights) {
    const int C = cols->count, D = job->head_dim, span = cols->longest;
    const void *k_cache = job->k_cache, *v_cache = job->v_cache;
    uint32_t q_pairs[AMX_MAX_DIM / 32][AMX_TILE_ROWS * AMX_MAX_GROUP];
    for (int w = 0; w < D / 32; w++)
        for (int p = 0; p < AMX_TILE_ROWS; p++)
            for (int col = 0; col < C; col++) memcpy(&q_pairs[w][p * C + col], cols->q[col] + 32 * w + 2 * p, 4);
    amx_attention_scores_config(C, D);
    _tile_loadd(2, q_pairs[0], 4 * C);
    _tile_loadd(3, q_pairs[1], 4 * C);
    if (D == 128) {
        _tile_loadd(5, q_pairs[2], 4 * C);
        _tile_loadd(6, q_pairs[3], 4 * C);
    }
    uint16_t gathered[CHUNK * AMX_MAX_DIM] __attribute__((aligned(64)));
    float chunk_scores[CHUNK][AMX_MAX_GROUP] __attribute__((aligned(64))) = {{0}}; /* positions x columns */
    __m512 max_score[AMX_MAX_GROUP];
    for (int col = 0; col < C; col++) max_score[col] = _mm512_set1_ps(-INFINITY);
    const __m512 scale = _mm512_set1_ps(job->scale);
    const int W = D / 32; /* 64-byte lines a row */
    /* A one-token decode reads its keys and values cold; a prompt's rows read what the rows before them did. */
    const int prefetch = C <= job->num_heads / job->num_kv_heads;
    for (int i = 0; prefetch && i < span && i < 2 * CHUNK; i++)
        for (int w = 0; w < W; w++) _mm_prefetch(bf16_word_address(job, k_cache, rows[i], w, 0), _MM_HINT_T0);
    for (int c = 0; c < span; c += CHUNK) {
        const int n = span - c < CHUNK ? span - c : CHUNK;
        if (prefetch) {
            for (int i = c + 2 * CHUNK; i < span && i < c + 3 * CHUNK; i++)
                for (int w = 0; w < W; w++) _mm_prefetch(bf16_word_address(job, k_cache, rows[i], w, 0), _MM_HINT_T0);
            for (int i = c; i < span && i < c + CHUNK; i++)
                for (int w = 0; w < W; w++) _mm_prefetch(bf16_word_address(job, v_cache, rows[i], w, 0), _MM_HINT_T1);
        }
        const uint16_t *keys = amx_key_rows(job, rows, c, n, gathered);
        _tile_zero(0);
        _tile_loadd(1, keys, D * 2);
        _tile_dpbf16ps(0, 1, 2);
        _tile_loadd(4, keys + 32, D * 2);
        _tile_dpbf16ps(0, 4, 3);
        if (D == 128) {
            _tile_loadd(1, keys + 64, D * 2);
            _tile_dpbf16ps(0, 1, 5);
            _tile_loadd(4, keys + 96, D * 2);
            _tile_dpbf16ps(0, 4, 6);
        }
        _tile_stored(0, chunk_scores, sizeof chunk_scores[0]);
        __m512 by_column[CHUNK]; /* the tile's rows are positions; each column's 16 scores as one vector */
        for (int i = 0; i < CHUNK; i++) by_column[i] = _mm512_load_ps(chunk_scores[i]);
        transpose16_ps(by_column);
        for (int col = 0; col < C; col++) {
            const int own = cols->span[col] - c < n ? cols->span[col] - c : n;
            if (own <= 0) continue;
            const __mmask16 valid = (__mmask16)((1u << own) - 1);
            const __m512 score = _mm512_mul_ps(by_column[col], scale);
            _mm512_mask_storeu_ps(scores + (long)col * span + c, valid, score);
            max_score[col] = _mm512_mask_max_ps(max_score[col], valid, max_score[col], score);
        }
    }
    const int padded = (span + AMX_VALUE_STEP - 1) / AMX_VALUE_STEP * AMX_VALUE_STEP;
    uint16_t *const rests = weights + (long)C * padded;
    float total[AMX_MAX_GROUP];
    for (int col = 0; col < C; col++) {
        const int own = cols->span[col];
        float *s = scores + (long)col * span;
        uint16_t *w = weights + (long)col * padded, *rest = rests + (long)col * padded;
        total[col] = softmax_numerators(s, own, _mm512_reduce_max_ps(max_score[col]));
        split_weights(s, own, w, rest);
        memset(w + own, 0, (size_t)(padded - own) * 2);
        memset(rest + own, 0, (size_t)(padded - own) * 2);
    }
    amx_attention_values_config(C);
    uint16_t values[4 * AMX_TILE_ROWS * 32] __attribute__((aligned(64)));
    float out[AMX_MAX_GROUP][AMX_MAX_DIM];
    for (int first = 0; first < D; first += AMX_VALUE_DIMS) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int c = 0; c < span; c += AMX_VALUE_STEP) {
            if (prefetch && first == 0)
                for (int i = c + PREFETCH_AHEAD; i < span && i < c + PREFETCH_AHEAD + AMX_VALUE_STEP; i++)
                    for (int w = 0; w < W; w++) _mm_prefetch(bf16_word_address(job, v_cache, rows[i], w, 0), _MM_HINT_T0);
            amx_value_tiles(job, rows, c, span, first, values);
            _tile_loadd(4, weights + c, padded * 2);
            _tile_loadd(5, rests + c, padded * 2);
            _tile_loadd(6, values, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(0, 5, 6);
            _tile_loadd(7, values + 512, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(1, 5, 7);
            _tile_loadd(6, values + 1024, 64);
            _tile_dpbf16ps(2, 4, 6);
            _tile_dpbf16ps(2, 5, 6);
            _tile_loadd(7, values + 1536, 64);
            _tile_dpbf16ps(3, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, &out[0][first], AMX_MAX_DIM * 4);
        _tile_stored(1, &out[0][first + 16], AMX_MAX_DIM * 4);
        _tile_stored(2, &out[0][first + 32], AMX_MAX_DIM * 4);
        _tile_stored(3, &out[0][first + 48], AMX_MAX_DIM * 4);
    }
    for (int col = 0; col < C; col++) store_row(job->out, cols->out[col], DTYPE_BF16, D, out[col], 1.f / total[col]);
}

static inline int amx_attention_takes(const Job *job) {
    const int G = job->num_heads / job->num_kv_heads;
    return job->dtype == DTYPE_BF16 && job->kv_dtype == DTYPE_BF16 && (job->head_dim == 64 || job->head_dim == 128) &&
           G <= AMX_MAX_GROUP && amx_usable();
}
#endif

/* Portable path for head sizes the vector path does not take. */
static void attend_item_scalar(const Job *job, long seq, int kv_head, const long *rows, float *scores, int span) {
    const int D = job->head_dim, G = job->num_heads / job->num_kv_heads;
    float q[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM], row[MAX_HEAD_DIM];
    float max_score[MAX_GROUP], total[MAX_GROUP];
    for (int g = 0; g < G; g++) {
        load_row(job->q, (seq * job->num_heads + (long)kv_head * G + g) * D, job->dtype, D, q[g]);
        max_score[g] = -INFINITY;
    }
    for (int i = 0; i < span; i++) {
        load_cache_row(job, job->k_cache, rows[i], row);
        for (int g = 0; g < G; g++) {
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < D; d++) dot += q[g][d] * row[d];
            dot *= job->scale;
            scores[(long)g * span + i] = dot;
            if (dot > max_score[g]) max_score[g] = dot;
        }
    }
    for (int g = 0; g < G; g++) {
        float sum = 0.f;
        float *s = scores + (long)g * span;
        for (int i = 0; i < span; i++) {
            s[i] = expf(s[i] - max_score[g]);
            sum += s[i];
        }
        total[g] = sum;
        memset(acc[g], 0, (size_t)D * sizeof(float));
    }
    for (int i = 0; i < span; i++) {
        load_cache_row(job, job->v_cache, rows[i], row);
        for (int g = 0; g < G; g++) {
            const float w = scores[(long)g * span + i];
#pragma omp simd
            for (int d = 0; d < D; d++) acc[g][d] += w * row[d];
        }
    }
    for (int g = 0; g < G; g++)
        store_row(job->out, (seq * job->num_heads + (long)kv_head * G + g) * D, job->dtype, D, acc[g], 1.f / total[g]);
}

/* One kv head of `count` consecutive rows of one sequence (more than one only on the tiles, `row_runs`); 0 when
 * scratch memory ran out. */
static int attend_item(const Job *job, long seq, int count, int kv_head, Scratch *scratch) {
    const int G = job->num_heads / job->num_kv_heads;
    const int seq_len = job->seq_lens[seq + count - 1];
    const int first = job->window > 0 && seq_len > job->window ? seq_len - job->window : 0;
    const int span = seq_len - first;
    if (!reserve(scratch, span, count * G)) return 0;
    item_rows(job, job->block_tables + seq * job->table_stride, first, span, kv_head, scratch->rows);
#if HAVE_AMX_TILES
    if (amx_attention_takes(job)) {
        AmxColumns cols;
        amx_columns(job, seq, count, kv_head, first, &cols);
        attend_amx(job, &cols, scratch->rows, scratch->scores, scratch->weights);
        return 1;
    }
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (job->dtype == DTYPE_BF16 && (job->kv_dtype == DTYPE_BF16 || IS_QUANTIZED(job->kv_dtype)) &&
        attend_item_bf16(job, seq, kv_head, scratch->rows, scratch->scores, scratch->weights, span))
        return 1;
#endif
#ifdef __AVX512F__
    if (job->head_dim % 16 == 0) {
        if (IS_QUANTIZED(job->kv_dtype))
            attend_item_avx512_quantized(job, seq, kv_head, scratch->rows, scratch->scores, span);
        else
            attend_item_avx512(job, seq, kv_head, scratch->rows, scratch->scores, span);
        return 1;
    }
#endif
#if HAVE_AVX2_ATTENTION
    if (job->head_dim % 8 == 0 && !IS_QUANTIZED(job->kv_dtype)) {
        attend_item_avx2(job, seq, kv_head, scratch->rows, scratch->scores, span);
        return 1;
    }
#endif
    attend_item_scalar(job, seq, kv_head, scratch->rows, scratch->scores, span);
    return 1;
}

/* Whether row r + 1 is the token after row r in the same sequence: one position further over the same block
 * table (a prompt or a draft attended row by row, attention.py's `row_contexts`), no window cutting either. */
static inline int next_row_of_same_sequence(const Job *job, long r) {
    const int len = job->seq_lens[r], next = job->seq_lens[r + 1];
    if (next != len + 1 || (job->window > 0 && next > job->window)) return 0;
    const int blocks = (next + job->block_size - 1) / job->block_size;
    return memcmp(job->block_tables + r * job->table_stride, job->block_tables + (r + 1) * job->table_stride,
                  (size_t)blocks * sizeof(int32_t)) == 0;
}

/* Splits rows into runs of at most `most` consecutive rows of one sequence; returns the number of runs.
 * starts[i] is run i's first row; starts[runs] = num_rows. */
static long row_runs(const Job *job, long num_rows, int most, long *starts) {
    long runs = 0;
    for (long r = 0; r < num_rows; r++)
        if (r == 0 || r - starts[runs - 1] == most || !next_row_of_same_sequence(job, r - 1)) starts[runs++] = r;
    starts[runs] = num_rows;
    return runs;
}

/* Below this many (position x kv head) reads, waking a second thread costs more than it saves. */
#define ATTENTION_PARALLEL_THRESHOLD 4096

/* Every (row, kv head) of the job; 0 when scratch memory ran out. On the tiles, consecutive rows of one sequence
 * share a pass (up to 16 query heads in all), so a prompt's keys and values are read once per few tokens
 * instead of once per token. The extension links libgomp.so.1, the soname PyTorch's own copy has, so once torch
 * is imported this is PyTorch's intra-op thread pool: no second pool spinning against it for the cores. */
static int decode_attention_run(const Job *job, long num_seqs, long total_positions, int threads) {
    const int K = job->num_kv_heads;
    int most = 1;
#if HAVE_AMX_TILES
    if (amx_attention_takes(job)) most = AMX_MAX_GROUP / (job->num_heads / K);
#endif
    long *starts = (long *)malloc((size_t)(num_seqs + 1) * sizeof(long));
    if (!starts) return 0;
    const long runs = row_runs(job, num_seqs, most, starts);
    const long items = runs * K;
    const int workers = total_positions * K >= ATTENTION_PARALLEL_THRESHOLD && threads > 1 ? threads : 1;
    int failed = 0;
#pragma omp parallel num_threads(workers) reduction(| : failed)
    {
        Scratch scratch = {NULL, NULL, NULL, 0, 0};
#pragma omp for schedule(dynamic, 1)
        for (long item = 0; item < items; item++) {
            const long run = item / K;
            if (!failed && !attend_item(job, starts[run], (int)(starts[run + 1] - starts[run]), (int)(item % K), &scratch))
                failed = 1;
        }
        free(scratch.rows);
        free(scratch.scores);
        free(scratch.weights);
#if HAVE_AMX_TILES
        if (amx_attention_takes(job)) _tile_release();
#endif
    }
    free(starts);
    return !failed;
}

#endif
