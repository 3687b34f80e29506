/*
 * bf16 linear layers for the CPU backend: y = x @ W^T with W pre-packed for AVX512-BF16.
 *
 * Packed layout: W (N, K) becomes (N_pad / 16, K_pad / 2, 16, 2): for each group of 16 output
 * features, consecutive pairs of input features, so one 512-bit load holds 16 outputs x 2 inputs and one
 * `vdpbf16ps` against a broadcast pair of x adds both products into 16 float32 accumulators. Each
 * weight load serves a tile of up to 8 rows of x, weights are read once per tile of rows from L1/L2,
 * and output features are spread over PyTorch's OpenMP threads (the extension links the same libgomp).
 * Accumulation is float32, rounded to bf16 once at the end, as oneDNN's bf16 GEMM does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_BF16_GEMM 1
#else
#define HAVE_BF16_GEMM 0
#endif

#define ROWS_PER_TILE 8 /* rows of x sharing each weight load (4 and 12 measured slower) */
#define VECTORS_PER_BLOCK 2 /* 16-feature weight vectors per work item: 32 output features */

#if HAVE_BF16_GEMM
typedef struct {
    const uint16_t *x, *w;
    uint16_t *y;
    long m, n, k_pairs, x_stride, y_stride;
} Gemm;

/* Rows m0 .. m0+MT-1 against output features 32*block .. 32*block+31. */
static inline __attribute__((always_inline)) void gemm_tile(const Gemm *g, long block, long m0, const int MT) {
    const long v0 = block * VECTORS_PER_BLOCK;
    const long vectors = g->n / 16 + (g->n % 16 != 0);
    const int nv = vectors - v0 < VECTORS_PER_BLOCK ? (int)(vectors - v0) : VECTORS_PER_BLOCK;
    const uint16_t *w0 = g->w + v0 * g->k_pairs * 32;
    const uint16_t *w1 = nv > 1 ? w0 + g->k_pairs * 32 : w0;
    __m512 acc0[ROWS_PER_TILE], acc1[ROWS_PER_TILE];
    for (int r = 0; r < MT; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    const int32_t *x_pairs[ROWS_PER_TILE];
    for (int r = 0; r < MT; r++) x_pairs[r] = (const int32_t *)(g->x + (m0 + r) * g->x_stride);
    for (long p = 0; p < g->k_pairs; p++) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(w0 + p * 32);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(w1 + p * 32);
        for (int r = 0; r < MT; r++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32(x_pairs[r][p]);
            acc0[r] = _mm512_dpbf16_ps(acc0[r], b0, a);
            acc1[r] = _mm512_dpbf16_ps(acc1[r], b1, a);
        }
    }
    for (int r = 0; r < MT; r++) {
        uint16_t *out = g->y + (m0 + r) * g->y_stride + v0 * 16;
        const long left = g->n - v0 * 16;
        const __mmask16 mask0 = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
        _mm256_mask_storeu_epi16(out, mask0, (__m256i)_mm512_cvtneps_pbh(acc0[r]));
        if (nv > 1) {
            const long left1 = left - 16;
            const __mmask16 mask1 = left1 >= 16 ? 0xFFFF : (__mmask16)((1u << left1) - 1);
            _mm256_mask_storeu_epi16(out + 16, mask1, (__m256i)_mm512_cvtneps_pbh(acc1[r]));
        }
    }
}

static void gemm_block(const Gemm *g, long block) {
    long m0 = 0;
    for (; m0 + ROWS_PER_TILE <= g->m; m0 += ROWS_PER_TILE) gemm_tile(g, block, m0, ROWS_PER_TILE);
    switch (g->m - m0) {
#define TAIL(t) case t: gemm_tile(g, block, m0, t); break;
        TAIL(1) TAIL(2) TAIL(3) TAIL(4) TAIL(5) TAIL(6) TAIL(7)
#undef TAIL
        default: break;
    }
}
#endif

/* Below this many multiply-adds, waking a second thread costs more than it saves. */
#define PARALLEL_THRESHOLD 200000

static PyObject *linear(PyObject *self, PyObject *args) {
    unsigned long long x, w, y;
    long m, n, k_pairs, x_stride, y_stride;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKllllli", &x, &w, &y, &m, &n, &k_pairs, &x_stride, &y_stride, &threads))
        return NULL;
#if HAVE_BF16_GEMM
    const Gemm g = {(const uint16_t *)x, (const uint16_t *)w, (uint16_t *)y, m, n, k_pairs, x_stride, y_stride};
    const long blocks = (n + 16 * VECTORS_PER_BLOCK - 1) / (16 * VECTORS_PER_BLOCK);
    const int workers = m * n * k_pairs * 2 >= PARALLEL_THRESHOLD && threads > 1 ? threads : 1;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for num_threads(workers) schedule(static)
    for (long block = 0; block < blocks; block++) gemm_block(&g, block);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_RuntimeError, "bf16 linear needs a build with AVX512-BF16");
    return NULL;
#endif
}

static PyObject *available(PyObject *self, PyObject *args) { return PyBool_FromLong(HAVE_BF16_GEMM); }

static PyMethodDef methods[] = {
    {"linear", linear, METH_VARARGS,
     "linear(x, packed_w, y, m, n, k_pairs, x_stride, y_stride, threads): data pointers of bf16 tensors; "
     "writes y (m, n) = x (m, 2 * k_pairs) @ W^T from the packed weight."},
    {"available", available, METH_NOARGS, "Whether this build has the AVX512-BF16 kernel."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bf16_gemm", "bf16 linear layers for the CPU backend.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__bf16_gemm(void) { return PyModule_Create(&module); }
