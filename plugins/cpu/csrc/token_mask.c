/*
 * Grammar masks (structured output) applied to float32 logits in place: every token whose bit is clear in
 * its row's bitmask becomes -inf. The bitmask is xgrammar's: int32 words, bit j of word w allowing token
 * 32 * w + j. A word with every bit set (rows without a grammar are all such words) is skipped after one
 * compare and a fully refused word (most words, under a grammar) is 32 plain stores, so unconstrained
 * rows cost almost nothing; PyTorch's unpack-and-fill reads and writes every logit of every row.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

static void mask_rows(float *logits, long logits_stride, const uint32_t *bitmask, long words_stride, long rows,
                      long vocab, int threads) {
    const long words = (vocab + 31) / 32;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > 1 && threads > 1)
    for (long r = 0; r < rows; r++) {
        float *row = logits + r * logits_stride;
        const uint32_t *bits = bitmask + r * words_stride;
        for (long w = 0; w < words; w++) {
            uint32_t refused = ~bits[w];
            if (!refused) continue;
            if (w == words - 1 && vocab % 32) {
                refused &= (1u << (vocab % 32)) - 1u;  /* no columns past vocab */
            } else if (refused == 0xFFFFFFFFu) {  /* the common case under a grammar: 32 stores the compiler vectorises */
                for (int j = 0; j < 32; j++) row[w * 32 + j] = -INFINITY;
                continue;
            }
            while (refused) {
                const int j = __builtin_ctz(refused);
                row[w * 32 + j] = -INFINITY;
                refused &= refused - 1u;
            }
        }
    }
}

static PyObject *apply(PyObject *self, PyObject *args) {
    unsigned long long logits, bitmask;
    long logits_stride, words_stride, rows, vocab;
    int threads;
    if (!PyArg_ParseTuple(args, "KlKllli", &logits, &logits_stride, &bitmask, &words_stride, &rows, &vocab, &threads))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    mask_rows((float *)logits, logits_stride, (const uint32_t *)bitmask, words_stride, rows, vocab, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"apply", apply, METH_VARARGS,
     "apply(logits, logits_stride, bitmask, words_stride, rows, vocab, threads): float32 logits masked in place"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_token_mask",
                                    "Grammar masks on logits, for the CPU backend.", -1, methods};

PyMODINIT_FUNC PyInit__token_mask(void) { return PyModule_Create(&module); }
