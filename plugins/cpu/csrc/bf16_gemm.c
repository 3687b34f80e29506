/*
 * bf16 linear layers for the CPU backend, as a CPython extension: see gemm_kernels.h for the kernels.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "gemm_kernels.h"

static int known_format(int format) {
    if (format >= GEMM_DENSE && format <= GEMM_Q8_0_TILES) return 1;
    PyErr_Format(PyExc_ValueError, "unknown weight format %d", format);
    return 0;
}

static PyObject *linear(PyObject *self, PyObject *args) {
    unsigned long long x, w, y;
    long m, n, k_pairs, x_stride, y_stride;
    int format, threads;
    if (!PyArg_ParseTuple(args, "iKKKllllli", &format, &x, &w, &y, &m, &n, &k_pairs, &x_stride, &y_stride,
                          &threads) || !known_format(format))
        return NULL;
#if HAVE_BF16_GEMM
    if (format != GEMM_DENSE && format != GEMM_Q4_1 && format != GEMM_Q8_0 && !HAVE_AVX512_GEMM) {
        PyErr_Format(PyExc_RuntimeError, "weight format %d needs a build with AVX512-BF16", format);
        return NULL;
    }
    if (format == GEMM_GROUPED && ((const GroupedHeader *)w)->in_features != k_pairs * 2) {
        PyErr_Format(PyExc_ValueError, "the grouped weight has %d inputs, x %ld",
                     ((const GroupedHeader *)w)->in_features, k_pairs * 2);
        return NULL;
    }
    if (format != GEMM_DENSE && format != GEMM_GROUPED && (k_pairs * 2) % GGML_BLOCK) {
        PyErr_Format(PyExc_ValueError, "ggml weights need a multiple of %d inputs, got %ld", GGML_BLOCK, k_pairs * 2);
        return NULL;
    }
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = gemm_linear(format, (const uint16_t *)x, (const void *)w, (uint16_t *)y, m, n, k_pairs, x_stride, y_stride,
                     threads);
    Py_END_ALLOW_THREADS
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_RuntimeError, "bf16 linear needs a build with AVX512-BF16 or AVX2 and FMA");
    return NULL;
#endif
}

static PyObject *pack_ggml(PyObject *self, PyObject *args) {
    unsigned long long src, dst;
    long out, blocks;
    int format;
    if (!PyArg_ParseTuple(args, "iKKll", &format, &src, &dst, &out, &blocks) || !known_format(format)) return NULL;
    if (format == GEMM_DENSE) {
        PyErr_SetString(PyExc_ValueError, "pack_ggml packs ggml formats only");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    pack_ggml_rows(format, (const uint8_t *)src, (uint8_t *)dst, out, blocks);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *pack_grouped(PyObject *self, PyObject *args) {
    unsigned long long codes, scales, offsets, dst;
    long n;
    if (!PyArg_ParseTuple(args, "KKKKl", &codes, &scales, &offsets, &dst, &n)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    pack_grouped_rows((const uint8_t *)codes, (const void *)scales, (const void *)offsets, (uint8_t *)dst, n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *unpack_grouped(PyObject *self, PyObject *args) {
    unsigned long long packed, dst;
    long n;
    if (!PyArg_ParseTuple(args, "KKl", &packed, &dst, &n)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    unpack_grouped_rows((const uint8_t *)packed, (float *)dst, n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *available(PyObject *self, PyObject *args) { return PyBool_FromLong(HAVE_BF16_GEMM); }

static PyObject *blocks(PyObject *self, PyObject *args) { return PyBool_FromLong(HAVE_AVX512_GEMM); }

static PyObject *ggml_blocks(PyObject *self, PyObject *args) { return PyBool_FromLong(HAVE_BF16_GEMM); }

static PyObject *int8_rows(PyObject *self, PyObject *args) {
#if HAVE_INT8_GEMM
    return PyLong_FromLong(INT8_MIN_ROWS);
#else
    Py_RETURN_NONE;
#endif
}

static PyMethodDef methods[] = {
    {"linear", linear, METH_VARARGS,
     "linear(format, x, w, y, m, n, k_pairs, x_stride, y_stride, threads): data pointers of bf16 x, y and "
     "the packed weight; writes y (m, n) = x (m, 2 * k_pairs) @ W^T. format: 0 dense bf16, 1 Q4_1, 2 Q8_0 "
     "(ggml formats: inputs a multiple of 32), 3 grouped (grouped_kernels.h), 4-5 Q4_1/Q8_0 against int8 "
     "activations, 6-7 Q4_1/Q8_0 dequantized onto AMX tiles (amx_gemm.h)."},
    {"pack_ggml", pack_ggml, METH_VARARGS,
     "pack_ggml(format, src, dst, out, blocks): ggml rows of blocks into the kernel's panels (dst: "
     "ceil(out / 16) x blocks x 320 (Q4_1) or 544 (Q8_0) bytes)."},
    {"pack_grouped", pack_grouped, METH_VARARGS,
     "pack_grouped(codes, scales, offsets, dst, out): a grouped weight's codes (out, in) uint8 and float32 "
     "(or, as the header says, fp16) scales and offsets (out, groups; offsets 0 for none) into the panels "
     "after the header already at dst "
     "(grouped_kernels.h)."},
    {"unpack_grouped", unpack_grouped, METH_VARARGS,
     "unpack_grouped(packed, dst, out): the float32 (out, in) weight a packed grouped weight computes with."},
    {"available", available, METH_NOARGS,
     "Whether this build has the dense kernel (AVX512-BF16, or AVX2 and FMA: avx2_gemm.h)."},
    {"blocks", blocks, METH_NOARGS,
     "Whether this build runs every block format: GGUF's, grouped codes (formats 1-7; AVX512-BF16)."},
    {"ggml_blocks", ggml_blocks, METH_NOARGS,
     "Whether this build runs GGUF's Q4_1 and Q8_0 blocks (formats 1-2; AVX512-BF16, or AVX2: avx2_gemm.h)."},
    {"amx", amx_py_usable, METH_NOARGS,
     "Whether dense weights run on AMX tiles (amx_gemm.h): a build and a CPU with AMX, not TOKENMILL_CPU_AMX=0."},
    {"set_amx", amx_py_want, METH_VARARGS,
     "set_amx(wanted): whether this module's dense linears may take AMX tiles (benchmarks, tests); returns amx()."},
    {"int8_rows", int8_rows, METH_NOARGS,
     "From how many rows Q4_1 and Q8_0 weights run against int8 activations (AVX512-VNNI); None without."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bf16_gemm", "bf16 linear layers for the CPU backend.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__bf16_gemm(void) { return PyModule_Create(&module); }
