/*
 * Scalar bf16 conversions and a vector exp shared by the CPU backend's kernels (header-only: each
 * extension is its own shared object, so these are static inline in each).
 */
#ifndef TOKENMILL_CPU_MATH_H
#define TOKENMILL_CPU_MATH_H

#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
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

#endif
