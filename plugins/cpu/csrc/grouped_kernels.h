/*
 * Group-wise quantized weights (a checkpoint's `QuantizedWeight`: GPTQ, AWQ, compressed-tensors, fp8, GGUF
 * K-quants) on AVX512-BF16, as the GGUF Q4_1 kernel in gemm_kernels.h runs its blocks: exact weight values
 * in bf16, `vdpbf16ps` sums S = sum w x over each group of inputs, and float32 adds scale S + offset sum(x)
 * per (output, group). The products are exact and the sums float32, so the result is the dequantized
 * weight's product rounded once, not the product with the weight rounded to bf16 first.
 *
 * The packed weight is one self-describing buffer (quant.py's `pack_grouped` writes it):
 *   GroupedHeader (320 bytes): the kind of codes, group size, whether there are offsets and an input order,
 *     in_features, whether scales are fp16, the zero point z of a symmetric weight (every offset -z scale:
 *     GGUF's Q4_0, Q5_0, Q6_K, symmetric GPTQ; its offsets are not stored), and a bf16 table (LUT4: the 16
 *     values of the codes; FP8: the 128 magnitudes).
 *   int32 input order (in_features, padded to 64 bytes) if any: x's columns are gathered once per call.
 *   Per panel of 16 outputs, per group of G inputs: 16 scales, 16 offsets (if any; both fp16 where every
 *   one is exact in fp16, as GGUF's legacy types' and symmetric GPTQ's are, else float32), then the codes
 *   in the dense 16 x 2 order of one input pair per 512-bit vector:
 *     4-bit kinds: G / 8 chunks of 32 16-bit words, nibble s of word 2o + i in chunk c the code of output o,
 *       input 2 (4c + s) + i (gemm_kernels.h's Q4_1 chunks);
 *     U5, U6 (B = 5, 6 bits): per unit of 16 input pairs (8 in groups of 16), each of the 32 16-bit lanes
 *       (2o + i) a stream of B-bit codes over ceil(16 B / 16) vectors: word w of vector k holds stream bits
 *       16k.. 16k + 15 of lane w, the code of input pair t at bit B t (0.625 and 0.75 bytes a weight: GGUF's
 *       Q5_0 and Q6_K sizes). A funnel shift of two vectors (AVX512-VBMI2's vpshrdvw) brings any pair's
 *       codes to the bottom of each word: as cheap a vector as the 4-bit kinds' shift;
 *     8-bit kinds: G / 2 pairs of 32 bytes, byte 2o + i of pair p the code of output o, input 2p + i.
 * Kinds: U4 (codes 0..15 read as 128 + q through the Q4_1 bit trick), LUT4 (codes through a 16-entry table
 * of bf16-exact values: GGUF's IQ4), U5 and U6 (read as 128 + q like U4, plus the high bits), U7 (codes
 * 0..127 in bytes, read as 128 + q like U4, one logic op a vector), I8 (uint8 codes minus 128 as int8, through float), FP8 (e4m3 or e5m2 bits: the
 * magnitude through a 128-entry table of their exact bf16 values, so subnormals stay exact where
 * `vdpbf16ps` would flush a shifted bit pattern, then the sign bit). Where the value read is the code plus
 * a centre c (U4, U5, U6, U7: 128; I8: -128; plus the zero point) the offset the kernel adds is offset - c
 * scale, computed once per (panel, group) in float32 as the Q4_1 kernel does; the packed scales and offsets
 * are the checkpoint's own.
 *
 * From GROUPED_MAX_ROWS rows on, each thread dequantizes its panels to bf16 into an L2-sized scratch and
 * runs the dense kernel over all the rows: prefill near dense speed without a dense copy of the weight.
 */
#ifndef TOKENMILL_GROUPED_KERNELS_H
#define TOKENMILL_GROUPED_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { GROUPED_U4 = 0, GROUPED_LUT4 = 1, GROUPED_I8 = 2, GROUPED_FP8 = 3, GROUPED_U7 = 4, GROUPED_U5 = 5, GROUPED_U6 = 6 };

#define GROUPED_HEADER_BYTES 320
/* From here on: dequantize panels to bf16 and run the dense kernel (benchmarks/NOTES.md, section 16). */
#define GROUPED_MAX_ROWS 32

typedef struct {
    int32_t kind, group_size, has_offsets, has_order, in_features, half_scales, zero, reserved[9];
    uint16_t table[128]; /* bf16 bit patterns */
} GroupedHeader;

static inline int grouped_is_4bit(int kind) { return kind == GROUPED_U4 || kind == GROUPED_LUT4; }

/* Bits a code takes in the stream kinds (U5, U6); 0 for the others. */
static inline int grouped_stream_bits(int kind) { return kind == GROUPED_U5 ? 5 : kind == GROUPED_U6 ? 6 : 0; }

/* Input pairs a stream unit holds: 16 where groups are multiples of 32 inputs, else 8. */
static inline int grouped_unit_pairs(long group) { return group % 32 ? 8 : 16; }

/* 64-byte vectors a stream unit takes. */
static inline int grouped_unit_vectors(int bits, int unit_pairs) { return (bits * unit_pairs + 15) / 16; }

/* What the kernel reads for code q, minus q, plus the zero point: the weight is scale (read - centre) + offset. */
static inline float grouped_centre(const GroupedHeader *h) {
    const int kind = h->kind;
    const float read = kind == GROUPED_U4 || kind == GROUPED_U5 || kind == GROUPED_U6 || kind == GROUPED_U7 ? 128.f
                     : kind == GROUPED_I8 ? -128.f : 0.f;
    return read + (float)h->zero;
}

/* Whether the kernel adds an offset times sum(x) per group. */
static inline int grouped_needs_sums(const GroupedHeader *h) {
    return h->has_offsets || grouped_centre(h) != 0.f;
}

/* Bytes of the 16 scales (and of the 16 offsets) of a (panel, group). */
static inline long grouped_scale_bytes(const GroupedHeader *h) { return h->half_scales ? 32 : 64; }

/* Bytes of one (panel, group)'s codes, and of the whole (panel, group): scales, offsets, codes. */
static inline long grouped_code_bytes(const GroupedHeader *h) {
    const long group = h->group_size;
    const int bits = grouped_stream_bits(h->kind), unit = grouped_unit_pairs(group);
    if (bits) return group / 2 / unit * grouped_unit_vectors(bits, unit) * 64;
    return grouped_is_4bit(h->kind) ? group * 8 : group * 16;
}

static inline long grouped_group_bytes(const GroupedHeader *h) {
    return grouped_scale_bytes(h) * (1 + h->has_offsets) + grouped_code_bytes(h);
}

static inline float f16_to_f32(uint16_t half) {
    const uint32_t sign = (uint32_t)(half & 0x8000) << 16, exponent = (half >> 10) & 31, mantissa = half & 1023;
    float magnitude;
    if (exponent == 0) magnitude = ldexpf((float)mantissa, -24);
    else if (exponent == 31) magnitude = mantissa ? NAN : INFINITY;
    else magnitude = ldexpf((float)(mantissa | 1024), (int)exponent - 25);
    uint32_t bits;
    memcpy(&bits, &magnitude, 4);
    bits |= sign;
    memcpy(&magnitude, &bits, 4);
    return magnitude;
}

/* Scale (or offset) i of the 16 at `at`. */
static inline float grouped_scale(const GroupedHeader *h, const uint8_t *at, int i) {
    return h->half_scales ? f16_to_f32(((const uint16_t *)at)[i]) : ((const float *)at)[i];
}

static inline long grouped_order_bytes(const GroupedHeader *h) {
    return h->has_order ? ((long)h->in_features * 4 + 63) / 64 * 64 : 0;
}

static inline const uint8_t *grouped_panels(const GroupedHeader *h) {
    return (const uint8_t *)h + GROUPED_HEADER_BYTES + grouped_order_bytes(h);
}

/* ---- Packing (once, at load) and unpacking (for the reference), scalar ------------------------------- */

/* codes (n, k) uint8 (4-bit kinds: 0..15; I8: already minus 128, as int8; FP8: the bits), scales and
 * offsets (n, k / G) float32 (fp16 where the header says so), offsets NULL without; the header already
 * written at `dst`. */
static void pack_grouped_rows(const uint8_t *codes, const void *scales, const void *offsets, uint8_t *dst, long n) {
    const GroupedHeader *h = (const GroupedHeader *)dst;
    const long k = h->in_features, group = h->group_size, groups = k / group, group_bytes = grouped_group_bytes(h);
    uint8_t *panels = (uint8_t *)grouped_panels(h);
    memset(panels, 0, (size_t)((n + 15) / 16 * groups * group_bytes));
    for (long row = 0; row < n; row++) {
        const int o = (int)(row % 16);
        for (long g = 0; g < groups; g++) {
            uint8_t *block = panels + ((row / 16) * groups + g) * group_bytes;
            const long size = h->half_scales ? 2 : 4, at = (row * groups + g) * size;
            memcpy(block + o * size, (const uint8_t *)scales + at, (size_t)size);
            if (h->has_offsets)
                memcpy(block + grouped_scale_bytes(h) + o * size, (const uint8_t *)offsets + at, (size_t)size);
            uint8_t *out = block + grouped_scale_bytes(h) * (1 + h->has_offsets);
            for (long i = 0; i < group; i++) {
                const uint8_t q = codes[row * k + g * group + i];
                const long pair = i / 2;
                if (grouped_is_4bit(h->kind)) {
                    ((uint16_t *)out)[(pair / 4) * 32 + 2 * o + i % 2] |= (uint16_t)((q & 15) << (4 * (pair % 4)));
                } else if (grouped_stream_bits(h->kind)) {
                    const int bits = grouped_stream_bits(h->kind), unit = grouped_unit_pairs(group);
                    uint16_t *words = (uint16_t *)out + pair / unit * grouped_unit_vectors(bits, unit) * 32;
                    const int at = bits * (int)(pair % unit), k = at / 16, s = at % 16, lane = 2 * o + (int)(i % 2);
                    words[k * 32 + lane] |= (uint16_t)(q << s);
                    if (s + bits > 16) words[(k + 1) * 32 + lane] |= (uint16_t)(q >> (16 - s));
                } else
                    out[pair * 32 + 2 * o + i % 2] = q;
            }
        }
    }
}

static inline float grouped_value(const GroupedHeader *h, const uint8_t *codes, long i, int o) {
    const long pair = i / 2;
    if (grouped_is_4bit(h->kind)) {
        const int q = (((const uint16_t *)codes)[(pair / 4) * 32 + 2 * o + i % 2] >> (4 * (pair % 4))) & 15;
        return h->kind == GROUPED_U4 ? (float)(128 + q) : bf16_to_f32(h->table[q]);
    }
    if (grouped_stream_bits(h->kind)) {
        const int bits = grouped_stream_bits(h->kind), unit = grouped_unit_pairs(h->group_size);
        const uint16_t *words = (const uint16_t *)codes + pair / unit * grouped_unit_vectors(bits, unit) * 32;
        const int at = bits * (int)(pair % unit), k = at / 16, s = at % 16, lane = 2 * o + (int)(i % 2);
        uint32_t stream = words[k * 32 + lane] >> s;
        if (s + bits > 16) stream |= (uint32_t)words[(k + 1) * 32 + lane] << (16 - s);
        return (float)(128 + (stream & ((1u << bits) - 1)));
    }
    const uint8_t q = codes[pair * 32 + 2 * o + i % 2];
    if (h->kind == GROUPED_U7) return (float)(128 + q);
    if (h->kind == GROUPED_I8) return (float)(int8_t)q;
    const float magnitude = bf16_to_f32(h->table[q & 127]);
    return q & 128 ? -magnitude : magnitude;
}

/* The weight the kernel computes with, (n, in_features) float32 in the natural input order: scale value +
 * (offset - centre scale), in float32 as the kernel does. */
static void unpack_grouped_rows(const uint8_t *packed, float *dst, long n) {
    const GroupedHeader *h = (const GroupedHeader *)packed;
    const int32_t *order = (const int32_t *)(packed + GROUPED_HEADER_BYTES);
    const long k = h->in_features, group = h->group_size, groups = k / group, group_bytes = grouped_group_bytes(h);
    for (long row = 0; row < n; row++)
        for (long g = 0; g < groups; g++) {
            const uint8_t *block = grouped_panels(h) + ((row / 16) * groups + g) * group_bytes;
            const int o = (int)(row % 16);
            const float scale = grouped_scale(h, block, o);
            const float stored = h->has_offsets ? grouped_scale(h, block + grouped_scale_bytes(h), o) : 0.f;
            const float offset = fmaf(-grouped_centre(h), scale, stored);
            const uint8_t *codes = block + grouped_scale_bytes(h) * (1 + h->has_offsets);
            for (long i = 0; i < group; i++) {
                const long column = g * group + i;
                const float value = grouped_value(h, codes, i, o);
                dst[row * k + (h->has_order ? order[column] : column)] = fmaf(scale, value, offset);
            }
        }
}

#if HAVE_AVX512_GEMM
/* The 16 scales (or offsets) at `at`, as float32. */
static inline __m512 grouped_load_scales(const GroupedHeader *h, const uint8_t *at) {
    return h->half_scales ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)at))
                          : _mm512_loadu_ps((const float *)at);
}

/* A (panel, group)'s scales, and the offsets the kernel adds: offset - centre scale (zero without offsets). */
static inline void grouped_load_block(const GroupedHeader *h, const uint8_t *block, __m512 *scale, __m512 *offset) {
    *scale = grouped_load_scales(h, block);
    const __m512 stored = h->has_offsets ? grouped_load_scales(h, block + grouped_scale_bytes(h)) : _mm512_setzero_ps();
    *offset = _mm512_fnmadd_ps(_mm512_set1_ps(grouped_centre(h)), *scale, stored);
}

/* ---- Codes to exact bf16 weights: one 512-bit vector of 16 outputs x 2 inputs -------------------------- */

typedef struct {
    __m512i lut4, fp8[4]; /* LUT4's 16 values; FP8's 128 magnitudes in 4 registers of 32 */
} GroupedTables;

static inline GroupedTables grouped_tables(const GroupedHeader *h) {
    GroupedTables t;
    t.lut4 = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)h->table));
    for (int i = 0; i < 4; i++) t.fp8[i] = _mm512_loadu_si512(h->table + 32 * i);
    return t;
}

/* Nibble s of each word of a 4-bit chunk. */
static inline __attribute__((always_inline)) __m512bh grouped_nibbles(__m512i chunk, const int shift, const int KIND,
                                                                      const GroupedTables *t) {
    if (KIND == GROUPED_U4) return q4_nibbles(chunk, shift);
    const __m512i q = _mm512_and_si512(shift ? _mm512_srli_epi16(chunk, shift) : chunk, _mm512_set1_epi16(15));
    return (__m512bh)_mm512_permutexvar_epi16(q, t->lut4);
}

/* U5/U6: the codes of pair t of the stream unit at `unit` (bits B t of each lane), read as 128 + q. */
static inline __attribute__((always_inline)) __m512bh grouped_stream_pair(const uint8_t *unit, const int t,
                                                                         const int KIND) {
    const int bits = grouped_stream_bits(KIND), at = bits * t, k = at / 16, s = at % 16;
    const __m512i lo = _mm512_loadu_si512(unit + k * 64);
    __m512i v = s ? _mm512_srli_epi16(lo, s) : lo;
    if (s + bits > 16) {
        const __m512i hi = _mm512_loadu_si512(unit + (k + 1) * 64);
#ifdef __AVX512VBMI2__
        v = _mm512_shrdv_epi16(lo, hi, _mm512_set1_epi16((short)s)); /* (hi:lo) >> s */
#else
        v = _mm512_or_si512(v, _mm512_slli_epi16(hi, 16 - s));
#endif
    }
    return (__m512bh)_mm512_ternarylogic_epi32(v, _mm512_set1_epi16((short)((1 << bits) - 1)),
                                               _mm512_set1_epi16(0x4300), 0xEA);
}

/* One stream unit of UNIT pairs from `pair` (codes at `units[j]` for panel j) into the group's sums. */
static inline __attribute__((always_inline)) void grouped_stream_unit(
    const uint8_t *const *units, const int32_t *const *x_pairs, long pair, __m512 sums[][ROWS_PER_TILE],
    const int MT, const int NP, const int KIND, const int UNIT) {
#pragma GCC unroll 16
    for (int t = 0; t < UNIT; t++)
        for (int j = 0; j < NP; j++) {
            const __m512bh w = grouped_stream_pair(units[j], t, KIND);
            for (int r = 0; r < MT; r++)
                sums[j][r] = _mm512_dpbf16_ps(sums[j][r], w, (__m512bh)_mm512_set1_epi32(x_pairs[r][pair + t]));
        }
}

/* One input pair of 8-bit codes (32 bytes). */
static inline __attribute__((always_inline)) __m512bh grouped_bytes(const uint8_t *codes, const int KIND,
                                                                    const GroupedTables *t) {
    if (KIND == GROUPED_I8) return q8_pair((const int8_t *)codes);
    const __m512i z = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)codes));
    if (KIND == GROUPED_U7) return (__m512bh)_mm512_or_si512(z, _mm512_set1_epi16(0x4300));
    const __m512i low = _mm512_permutex2var_epi16(t->fp8[0], z, t->fp8[1]);
    const __m512i high = _mm512_permutex2var_epi16(t->fp8[2], z, t->fp8[3]);
    const __m512i magnitude = _mm512_mask_mov_epi16(low, _mm512_test_epi16_mask(z, _mm512_set1_epi16(64)), high);
    /* magnitude | (z << 8 & 0x8000): the sign bit */
    return (__m512bh)_mm512_ternarylogic_epi32(magnitude, _mm512_slli_epi16(z, 8), _mm512_set1_epi16((short)0x8000),
                                               0xF8);
}

/* ---- Few rows: the group-wise kernel ---------------------------------------------------------------- */

/* Rows m0 .. m0+MT-1 against NP panels from v0 (those past the last computed from the last, not stored).
 * Per group: S = sum w x by vdpbf16ps, then y += scale S (+ offset sum(x)) in float32. A row's arithmetic
 * is the same whatever NP and MT, so its result does not depend on the batch it runs in. */
static inline __attribute__((always_inline)) void grouped_tile(const Gemm *g, const GroupedHeader *h,
                                                               const float *x_sums, long v0, long m0, const int MT,
                                                               const int NP, const int KIND) {
    const long group = h->group_size, groups = h->in_features / group, group_bytes = grouped_group_bytes(h);
    const long panels = num_panels(g), codes_at = grouped_scale_bytes(h) * (1 + h->has_offsets);
    const int sums_needed = grouped_needs_sums(h);
    const GroupedTables tables = grouped_tables(h);
    const uint8_t *panel[GGML_MAX_PANELS];
    for (int j = 0; j < NP; j++)
        panel[j] = grouped_panels(h) + (v0 + j < panels ? v0 + j : panels - 1) * groups * group_bytes;
    const int32_t *x_pairs[ROWS_PER_TILE];
    for (int r = 0; r < MT; r++) x_pairs[r] = (const int32_t *)(g->x + (m0 + r) * g->x_stride);
    __m512 acc[GGML_MAX_PANELS][ROWS_PER_TILE];
    for (int j = 0; j < NP; j++)
        for (int r = 0; r < MT; r++) acc[j][r] = _mm512_setzero_ps();
    for (long b = 0; b < groups; b++) {
        __m512 sums[GGML_MAX_PANELS][ROWS_PER_TILE];
        for (int j = 0; j < NP; j++)
            for (int r = 0; r < MT; r++) sums[j][r] = _mm512_setzero_ps();
        const long first_pair = b * group / 2;
        if (grouped_stream_bits(KIND)) {
            const int unit = grouped_unit_pairs(group);
            const long unit_bytes = grouped_unit_vectors(grouped_stream_bits(KIND), unit) * 64;
            for (long u = 0; u < group / 2 / unit; u++) {
                const uint8_t *units[GGML_MAX_PANELS];
                for (int j = 0; j < NP; j++) units[j] = panel[j] + b * group_bytes + codes_at + u * unit_bytes;
                if (unit == 16) grouped_stream_unit(units, x_pairs, first_pair + u * 16, sums, MT, NP, KIND, 16);
                else grouped_stream_unit(units, x_pairs, first_pair + u * 8, sums, MT, NP, KIND, 8);
            }
        } else if (grouped_is_4bit(KIND)) {
            for (long c = 0; c < group / 8; c++) {
                __m512i chunk[GGML_MAX_PANELS];
                for (int j = 0; j < NP; j++)
                    chunk[j] = _mm512_loadu_si512(panel[j] + b * group_bytes + codes_at + c * 64);
                for (int sh = 0; sh < 4; sh++)
                    for (int j = 0; j < NP; j++) {
                        const __m512bh w = grouped_nibbles(chunk[j], 4 * sh, KIND, &tables);
                        const long pair = first_pair + 4 * c + sh;
                        for (int r = 0; r < MT; r++)
                            sums[j][r] = _mm512_dpbf16_ps(sums[j][r], w, (__m512bh)_mm512_set1_epi32(x_pairs[r][pair]));
                    }
            }
        } else {
            for (long p = 0; p < group / 2; p++)
                for (int j = 0; j < NP; j++) {
                    const __m512bh w = grouped_bytes(panel[j] + b * group_bytes + codes_at + p * 32, KIND, &tables);
                    for (int r = 0; r < MT; r++)
                        sums[j][r] = _mm512_dpbf16_ps(sums[j][r], w,
                                                      (__m512bh)_mm512_set1_epi32(x_pairs[r][first_pair + p]));
                }
        }
        for (int j = 0; j < NP; j++) {
            __m512 scale, offset;
            grouped_load_block(h, panel[j] + b * group_bytes, &scale, &offset);
            for (int r = 0; r < MT; r++) acc[j][r] = _mm512_fmadd_ps(scale, sums[j][r], acc[j][r]);
            if (sums_needed) {
                for (int r = 0; r < MT; r++)
                    acc[j][r] = _mm512_fmadd_ps(offset, _mm512_set1_ps(x_sums[(m0 + r) * groups + b]), acc[j][r]);
            }
        }
    }
    for (int j = 0; j < NP; j++) store_panel(g, acc[j], v0 + j, m0, MT);
}

static inline __attribute__((always_inline)) void grouped_item(const Gemm *g, const GroupedHeader *h,
                                                               const float *x_sums, long item, const int NP,
                                                               const int KIND) {
    const long v0 = item * NP;
    long m0 = 0;
    for (; m0 + ROWS_PER_TILE <= g->m; m0 += ROWS_PER_TILE) grouped_tile(g, h, x_sums, v0, m0, ROWS_PER_TILE, NP, KIND);
    switch (g->m - m0) {
#define TAIL(t) case t: grouped_tile(g, h, x_sums, v0, m0, t, NP, KIND); break;
        TAIL(1) TAIL(2) TAIL(3) TAIL(4) TAIL(5) TAIL(6) TAIL(7)
#undef TAIL
        default: break;
    }
}

#define GROUPED_KINDS(NP)                                                  \
    switch (h->kind) {                                                     \
        case GROUPED_U4: grouped_item(g, h, x_sums, item, NP, GROUPED_U4); break;     \
        case GROUPED_LUT4: grouped_item(g, h, x_sums, item, NP, GROUPED_LUT4); break; \
        case GROUPED_I8: grouped_item(g, h, x_sums, item, NP, GROUPED_I8); break;     \
        case GROUPED_U7: grouped_item(g, h, x_sums, item, NP, GROUPED_U7); break;     \
        case GROUPED_U5: grouped_item(g, h, x_sums, item, NP, GROUPED_U5); break;     \
        case GROUPED_U6: grouped_item(g, h, x_sums, item, NP, GROUPED_U6); break;     \
        default: grouped_item(g, h, x_sums, item, NP, GROUPED_FP8); break;            \
    }

static void grouped_run(const Gemm *g, const GroupedHeader *h, const float *x_sums, long item) {
    if (ggml_panels_per_item(g->m) == GGML_MAX_PANELS) {
        GROUPED_KINDS(GGML_MAX_PANELS)
    } else {
        GROUPED_KINDS(2)
    }
}
#undef GROUPED_KINDS

/* ---- Many rows: panels dequantized to bf16, then the dense kernel ------------------------------------ */

/* Panel v's weights, scale value + offset rounded to bf16, in the dense layout of gemm_kernels.h. */
static inline __attribute__((always_inline)) void grouped_dequantize_panel(const GroupedHeader *h, long v,
                                                                           uint16_t *dense, const int KIND) {
    const long group = h->group_size, groups = h->in_features / group, group_bytes = grouped_group_bytes(h);
    const GroupedTables tables = grouped_tables(h);
    const __m512i low_outputs = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i high_outputs = _mm512_add_epi32(low_outputs, _mm512_set1_epi32(8));
    for (long b = 0; b < groups; b++) {
        const uint8_t *block = grouped_panels(h) + (v * groups + b) * group_bytes;
        const uint8_t *codes = block + grouped_scale_bytes(h) * (1 + h->has_offsets);
        __m512 scale, offset;
        grouped_load_block(h, block, &scale, &offset);
        const __m512 scale_lo = _mm512_permutexvar_ps(low_outputs, scale);
        const __m512 scale_hi = _mm512_permutexvar_ps(high_outputs, scale);
        const __m512 offset_lo = _mm512_permutexvar_ps(low_outputs, offset);
        const __m512 offset_hi = _mm512_permutexvar_ps(high_outputs, offset);
        for (long p = 0; p < group / 2; p++) {
            __m512i w;
            if (grouped_stream_bits(KIND)) {
                const int unit = grouped_unit_pairs(group);
                const long unit_bytes = grouped_unit_vectors(grouped_stream_bits(KIND), unit) * 64;
                w = (__m512i)grouped_stream_pair(codes + p / unit * unit_bytes, (int)(p % unit), KIND);
            } else if (grouped_is_4bit(KIND)) {
                w = (__m512i)grouped_nibbles(_mm512_loadu_si512(codes + (p / 4) * 64), 4 * (int)(p % 4), KIND, &tables);
            } else {
                w = (__m512i)grouped_bytes(codes + p * 32, KIND, &tables);
            }
            const __m512i low_words = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(w));
            const __m512i high_words = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1));
            const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(low_words, 16));
            const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(high_words, 16));
            const __m512bh out = _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(scale_hi, hi, offset_hi),
                                                     _mm512_fmadd_ps(scale_lo, lo, offset_lo));
            _mm512_storeu_si512(dense + (b * group / 2 + p) * 32, (__m512i)out);
        }
    }
}

static void grouped_dequantize_item(const Gemm *g, const GroupedHeader *h, long item, uint16_t *scratch) {
    const long v0 = item * PANELS_PER_BLOCK, panels = num_panels(g);
    const int nv = panels - v0 < PANELS_PER_BLOCK ? (int)(panels - v0) : PANELS_PER_BLOCK;
    for (int j = 0; j < nv; j++) {
        uint16_t *dense = scratch + j * g->k_pairs * 32;
        switch (h->kind) {
            case GROUPED_U4: grouped_dequantize_panel(h, v0 + j, dense, GROUPED_U4); break;
            case GROUPED_LUT4: grouped_dequantize_panel(h, v0 + j, dense, GROUPED_LUT4); break;
            case GROUPED_I8: grouped_dequantize_panel(h, v0 + j, dense, GROUPED_I8); break;
            case GROUPED_U7: grouped_dequantize_panel(h, v0 + j, dense, GROUPED_U7); break;
            case GROUPED_U5: grouped_dequantize_panel(h, v0 + j, dense, GROUPED_U5); break;
            case GROUPED_U6: grouped_dequantize_panel(h, v0 + j, dense, GROUPED_U6); break;
            default: grouped_dequantize_panel(h, v0 + j, dense, GROUPED_FP8); break;
        }
    }
    dense_rows(g, scratch, nv > 1 ? scratch + g->k_pairs * 32 : scratch, v0, nv);
}

/* sum(x) over each row's groups, (m, groups) float32. */
static void group_sums(const Gemm *g, long group, float *x_sums) {
    const long k = g->k_pairs * 2, groups = k / group;
    for (long r = 0; r < g->m; r++)
        for (long b = 0; b < groups; b++) {
            __m512 sum = _mm512_setzero_ps();
            for (long i = b * group; i < (b + 1) * group; i += 16) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(g->x + r * g->x_stride + i));
                sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
            }
            x_sums[r * groups + b] = _mm512_reduce_add_ps(sum);
        }
}

/* y (m, n) = x @ W^T for a grouped weight (k_pairs * 2 == in_features, a multiple of 16); 0 when out of
 * memory. x's columns are gathered into the input order first where the weight has one. */
static int grouped_linear(Gemm g, const GroupedHeader *h, int threads) {
    const long k = g.k_pairs * 2, groups = k / h->group_size;
    const int dense = g.m >= GROUPED_MAX_ROWS;
    if (g.m == 0) return 1;
    uint16_t *ordered = NULL;
    float *x_sums = NULL;
    if (h->has_order) {
        const int32_t *order = (const int32_t *)((const uint8_t *)h + GROUPED_HEADER_BYTES);
        if (!(ordered = malloc(sizeof(uint16_t) * (size_t)(g.m * k)))) return 0;
        for (long r = 0; r < g.m; r++)
            for (long i = 0; i < k; i++) ordered[r * k + i] = g.x[r * g.x_stride + order[i]];
        g.x = ordered;
        g.x_stride = k;
    }
    if (!dense && grouped_needs_sums(h)) {
        if (!(x_sums = malloc(sizeof(float) * (size_t)(g.m * groups + 1)))) {
            free(ordered);
            return 0;
        }
        group_sums(&g, h->group_size, x_sums);
    }
    const long per_item = dense ? PANELS_PER_BLOCK : ggml_panels_per_item(g.m);
    const long items = (num_panels(&g) + per_item - 1) / per_item;
    const int workers = g.m * g.n * k >= GEMM_PARALLEL_THRESHOLD && threads > 1 ? threads : 1;
    const long items_per_take = work_chunk(g.m, items, workers);
    int ok = 1;
#pragma omp parallel num_threads(workers)
    {
        uint16_t *scratch = dense ? malloc(sizeof(uint16_t) * (size_t)(PANELS_PER_BLOCK * g.k_pairs * 32)) : NULL;
        if (dense && !scratch) {
#pragma omp atomic write
            ok = 0;
        }
#pragma omp for schedule(dynamic, items_per_take)
        for (long item = 0; item < items; item++) {
            if (!dense) grouped_run(&g, h, x_sums, item);
            else if (scratch) grouped_dequantize_item(&g, h, item, scratch);
        }
        free(scratch);
    }
    free(x_sums);
    free(ordered);
    return ok;
}
#endif

#endif
