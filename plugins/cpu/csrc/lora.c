/*
 * LoRA for steps of few tokens (decodes): y[t] += B[s] (A[s] x[t]) for every token t that uses adapter slot
 * s, accumulated in float32, each token reading only its own adapter. At decode sizes the PyTorch path
 * (two masked GEMMs over the step's adapters, ~5 calls a layer) costs more in dispatch than this arithmetic.
 *
 * x: rows of `in` values (row stride x_stride), y: rows of `out` values (row stride y_stride), both bf16 or
 * both float32 as `bf16` says, like the stacks: a (slots, rank, in) and bt (slots, rank, out), B transposed
 * so that a token's update of 16 outputs reads 16 contiguous values per rank. `rows[i]` is the i-th adapter
 * token's row and `slots[i]` its slot; every row appears once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include "layer_kernels.h"

static inline float load1(const void *p, long i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

#ifdef __AVX512F__
/* Lanes i..i+15 of a row (those `m` keeps), as float32. */
static inline __m512 load16(const void *p, long i, __mmask16 m, int bf16) {
    return bf16 ? load_bf16x16((const uint16_t *)p + i, m) : _mm512_maskz_loadu_ps(m, (const float *)p + i);
}
#endif

static inline float dot(const void *x, const void *w, long n, int bf16) {
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (long i = 0; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        acc = _mm512_fmadd_ps(load16(x, i, m, bf16), load16(w, i, m, bf16), acc);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float acc = 0.f;
    for (long i = 0; i < n; i++) acc += load1(x, i, bf16) * load1(w, i, bf16);
    return acc;
#endif
}

/* y[row, o:o+16] += sum_r h[r] * bt[r, o:o+16] for one token (fewer lanes at the end). */
static inline void expand16(void *y, const void *bt, const float *h, long o, long out, long rank, int bf16) {
#ifdef __AVX512F__
    const __mmask16 m = tail_mask(out - o);
    __m512 acc = load16(y, o, m, bf16);
    for (long r = 0; r < rank; r++) acc = _mm512_fmadd_ps(_mm512_set1_ps(h[r]), load16(bt, r * out + o, m, bf16), acc);
    if (bf16)
        _mm256_mask_storeu_epi16((uint16_t *)y + o, m, to_bf16x16(acc));
    else
        _mm512_mask_storeu_ps((float *)y + o, m, acc);
#else
    for (long j = o; j < o + 16 && j < out; j++) {
        float acc = load1(y, j, bf16);
        for (long r = 0; r < rank; r++) acc += h[r] * load1(bt, r * out + j, bf16);
        if (bf16)
            ((uint16_t *)y)[j] = f32_to_bf16(acc);
        else
            ((float *)y)[j] = acc;
    }
#endif
}

static int lora_rows(const char *x, long x_stride, char *y, long y_stride, const char *a, const char *bt,
                     const int64_t *rows, const int64_t *slots, long n, long in, long out, long rank, int bf16,
                     int threads) {
    const long size = bf16 ? 2 : 4;
    float *h = malloc(sizeof(float) * n * rank);
    if (!h) return -1;
#pragma omp parallel for num_threads(threads) schedule(static) if (n * rank * in >= PARALLEL_ELEMENTS && threads > 1)
    for (long k = 0; k < n * rank; k++) {
        const long t = k / rank, r = k % rank;
        h[k] = dot(x + rows[t] * x_stride * size, a + (slots[t] * rank + r) * in * size, in, bf16);
    }
    const long blocks = (out + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static) if (n * rank * out >= PARALLEL_ELEMENTS && threads > 1)
    for (long block = 0; block < blocks; block++)
        for (long t = 0; t < n; t++)
            expand16(y + rows[t] * y_stride * size, bt + slots[t] * rank * out * size, h + t * rank, block * 16,
                     out, rank, bf16);
    free(h);
    return 0;
}

static PyObject *apply(PyObject *self, PyObject *args) {
    unsigned long long x, y, a, bt, rows, slots;
    long x_stride, y_stride, n, in, out, rank;
    int bf16, threads, failed;
    if (!PyArg_ParseTuple(args, "KlKlKKKKllllii", &x, &x_stride, &y, &y_stride, &a, &bt, &rows, &slots, &n, &in,
                          &out, &rank, &bf16, &threads))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    failed = lora_rows((const char *)x, x_stride, (char *)y, y_stride, (const char *)a, (const char *)bt,
                       (const int64_t *)rows, (const int64_t *)slots, n, in, out, rank, bf16, threads);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"apply", apply, METH_VARARGS,
     "apply(x, x_stride, y, y_stride, a, bt, rows, slots, n, in, out, rank, bf16, threads): y updated in place"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lora", "LoRA for decode steps, for the CPU backend.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__lora(void) { return PyModule_Create(&module); }
