/*
 * Scalar bf16 conversions and a vector exp shared by the CPU backend's kernels (header-only: each
 * extension is its own shared object, so these are static inline in each).
 */
#ifndef TOKENMILL_CPU_MATH_H
#define TOKENMILL_CPU_MATH_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    bits += 0x7FFF + ((bits >> 16) & 1); /* round to nearest even, as PyTorch does */
    return (uint16_t)(bits >> 16);
}

#ifdef __AVX512F__
/* exp(x) for 16 lanes: x = n ln2 + y with |y| <= ln2 / 2, e^y by its Taylor series to degree 7 (relative
 * error under 1e-8), then scaled by 2^n. Scalar expf cost as much as the dot products around it. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f)); /* below this expf is 0 anyway */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 y = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147180559945309f), x);
    __m512 p = _mm512_set1_ps(1.f / 5040);
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 720));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
/* exp16's arithmetic for 8 lanes on CPUs without AVX-512 (AMD Zen 1-3, Intel before Skylake-X). With no
 * scalef, 2^n goes into the exponent bits, so x is clamped to [-87, 88], where 2^n stays a normal float. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 y = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147180559945309f), x);
    __m256 p = _mm256_set1_ps(1.f / 5040);
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f / 720));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f));
    const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

static inline float reduce_max8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

static inline float reduce_add8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
#endif

#endif
