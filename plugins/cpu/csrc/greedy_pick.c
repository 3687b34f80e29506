/*
 * Greedy decoding's token and its log-probability in one pass over each row of float32 logits: the first
 * of the largest logits (argmax's choice), and -log(sum(exp(x - max))), which is log_softmax at the max.
 * PyTorch takes an argmax, a log_softmax that writes the whole (rows, vocab) result, and a gather: three
 * passes and a batch-sized allocation, ~3.5 ms a step at 64 rows of a 49,152-token vocabulary, against
 * ~0.5 ms here. Each row is one thread's, in one order, so a row's result does not depend on its batch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include "cpu_math.h"

/* The row's first largest logit's index and the log of its softmax there. A NaN logit makes the first NaN
 * the token, as argmax does; a NaN logit or an infinite max (a row all -inf, or a +inf) leaves no
 * distribution, and the log-probability is NaN, as log_softmax gives. */
static void pick_row(const float *row, long vocab, int64_t *token, float *logprob) {
    long i = 0;
    float max = -INFINITY;
    int has_nan = 0;
#ifdef __AVX512F__
    __m512 lane_max = _mm512_set1_ps(-INFINITY);
    __mmask16 nan_lanes = 0;
    for (; i + 16 <= vocab; i += 16) {
        const __m512 v = _mm512_loadu_ps(row + i);
        nan_lanes |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        lane_max = _mm512_max_ps(lane_max, v);
    }
    max = _mm512_reduce_max_ps(lane_max);
    has_nan = nan_lanes != 0;
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 lane_max = _mm256_set1_ps(-INFINITY);
    __m256 nan_lanes = _mm256_setzero_ps();
    for (; i + 8 <= vocab; i += 8) {
        const __m256 v = _mm256_loadu_ps(row + i);
        nan_lanes = _mm256_or_ps(nan_lanes, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        lane_max = _mm256_max_ps(lane_max, v);
    }
    max = reduce_max8(lane_max);
    has_nan = _mm256_movemask_ps(nan_lanes) != 0;
#endif
    for (; i < vocab; i++) {
        has_nan |= isnan(row[i]);
        max = row[i] > max ? row[i] : max;
    }
    long best = 0;
    if (has_nan) {
        while (!isnan(row[best])) best++;
    } else {
        while (best < vocab - 1 && row[best] != max) best++;
    }
    *token = best;
    if (has_nan || !isfinite(max)) {
        *logprob = NAN;
        return;
    }
    float sum = 0.f;
    i = 0;
#ifdef __AVX512F__
    const __m512 m = _mm512_set1_ps(max);
    __m512 lane_sum = _mm512_setzero_ps();
    for (; i + 16 <= vocab; i += 16) lane_sum = _mm512_add_ps(lane_sum, exp16(_mm512_sub_ps(_mm512_loadu_ps(row + i), m)));
    sum = _mm512_reduce_add_ps(lane_sum);
#elif defined(__AVX2__) && defined(__FMA__)
    /* Two accumulators: 16 partial sums, as many as the AVX-512 path keeps, hold the rounding as low. */
    const __m256 m = _mm256_set1_ps(max);
    __m256 lane_sum[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; i + 16 <= vocab; i += 16) {
        lane_sum[0] = _mm256_add_ps(lane_sum[0], exp8(_mm256_sub_ps(_mm256_loadu_ps(row + i), m)));
        lane_sum[1] = _mm256_add_ps(lane_sum[1], exp8(_mm256_sub_ps(_mm256_loadu_ps(row + i + 8), m)));
    }
    sum = reduce_add8(_mm256_add_ps(lane_sum[0], lane_sum[1]));
#endif
    double tail = 0.0; /* the scalar build sums the whole row here: in double, or 49,152 terms drift */
    for (; i < vocab; i++) tail += expf(row[i] - max);
    sum += (float)tail;
    *logprob = -logf(sum);
}

static PyObject *pick(PyObject *self, PyObject *args) {
    unsigned long long logits, tokens, logprobs;
    long stride, rows, vocab;
    int threads;
    if (!PyArg_ParseTuple(args, "KlKKlli", &logits, &stride, &tokens, &logprobs, &rows, &vocab, &threads))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    /* Rows one at a time: a preempted thread leaves its rows to the other (see gemm_kernels.h's work_chunk). */
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (rows > 1 && threads > 1)
    for (long r = 0; r < rows; r++)
        pick_row((const float *)logits + r * stride, vocab, (int64_t *)tokens + r, (float *)logprobs + r);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"pick", pick, METH_VARARGS,
     "pick(logits, stride, tokens, logprobs, rows, vocab, threads): per row of float32 logits, the greedy token "
     "(int64) and its log-softmax (float32), written to tokens and logprobs."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_greedy_pick",
                                    "Greedy tokens and their log-probabilities, for the CPU backend.", -1, methods};

PyMODINIT_FUNC PyInit__greedy_pick(void) { return PyModule_Create(&module); }
