/*
 * bf16 linear layers for the CPU backend, as a CPython extension: see gemm_kernels.h for the kernels.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "gemm_kernels.h"

static PyObject *run_linear(PyObject *args, int format) {
    unsigned long long x, w, y;
    long m, n, k_pairs, x_stride, y_stride;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKllllli", &x, &w, &y, &m, &n, &k_pairs, &x_stride, &y_stride, &threads))
        return NULL;
#if HAVE_BF16_GEMM
    if (format != GEMM_DENSE && (k_pairs * 2) % GGML_BLOCK) {
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
    PyErr_SetString(PyExc_RuntimeError, "bf16 linear needs a build with AVX512-BF16");
    return NULL;
#endif
}

static PyObject *linear(PyObject *self, PyObject *args) { return run_linear(args, GEMM_DENSE); }

static PyObject *linear_q4_1(PyObject *self, PyObject *args) { return run_linear(args, GEMM_Q4_1); }

static PyObject *linear_q8_0(PyObject *self, PyObject *args) { return run_linear(args, GEMM_Q8_0); }
static PyObject *pack(PyObject *args, void (*packer)(const uint8_t *, uint8_t *, long, long)) {
    unsigned long long src, dst;
    long out, blocks;
    if (!PyArg_ParseTuple(args, "KKll", &src, &dst, &out, &blocks)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    packer((const uint8_t *)src, (uint8_t *)dst, out, blocks);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *pack_q4_1(PyObject *self, PyObject *args) { return pack(args, pack_q4_1_rows); }

static PyObject *pack_q8_0(PyObject *self, PyObject *args) { return pack(args, pack_q8_0_rows); }

static PyObject *available(PyObject *self, PyObject *args) { return PyBool_FromLong(HAVE_BF16_GEMM); }

static PyMethodDef methods[] = {
    {"linear", linear, METH_VARARGS,
     "linear(x, packed_w, y, m, n, k_pairs, x_stride, y_stride, threads): data pointers of bf16 tensors; "
     "writes y (m, n) = x (m, 2 * k_pairs) @ W^T from the packed weight."},
    {"linear_q4_1", linear_q4_1, METH_VARARGS,
     "linear_q4_1(x, packed_q4_1, y, m, n, k_pairs, x_stride, y_stride, threads): as linear, with W given "
     "as packed Q4_1 blocks (inputs a multiple of 32)."},
    {"linear_q8_0", linear_q8_0, METH_VARARGS, "linear_q8_0(...): as linear_q4_1, for packed Q8_0 blocks."},
    {"pack_q4_1", pack_q4_1, METH_VARARGS,
     "pack_q4_1(src, dst, out, blocks): ggml Q4_1 rows into the kernel's panels (dst: ceil(out / 16) x "
     "blocks x 320 bytes)."},
    {"pack_q8_0", pack_q8_0, METH_VARARGS, "pack_q8_0(src, dst, out, blocks): as pack_q4_1, 544 bytes a block."},
    {"available", available, METH_NOARGS, "Whether this build has the AVX512-BF16 kernel."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bf16_gemm", "bf16 linear layers for the CPU backend.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__bf16_gemm(void) { return PyModule_Create(&module); }
