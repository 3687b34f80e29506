/*
 * The fused per-token layer ops of layer_kernels.h as a CPython extension; arguments are data
 * pointers of tensors the Python side (layer_ops.py) has checked.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "layer_kernels.h"

static PyObject *add_rms_norm(PyObject *self, PyObject *args) {
    unsigned long long x, residual, weight, out, residual_out;
    long rows, size;
    float eps, offset;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKllffi", &x, &residual, &weight, &out, &residual_out, &rows, &size, &eps,
                          &offset, &threads))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    add_rms_norm_rows((const uint16_t *)x, (const uint16_t *)residual, (const uint16_t *)weight, (uint16_t *)out,
                      (uint16_t *)residual_out, rows, size, eps, offset, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *rms_norm_heads_op(PyObject *self, PyObject *args) {
    unsigned long long x, weight, out;
    long rows, row_stride, heads, head_dim, out_stride;
    float eps, offset;
    int threads;
    if (!PyArg_ParseTuple(args, "KllllKKlffi", &x, &rows, &row_stride, &heads, &head_dim, &weight, &out, &out_stride,
                          &eps, &offset, &threads))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rms_norm_heads((const uint16_t *)x, rows, row_stride, heads, head_dim, (const uint16_t *)weight, (uint16_t *)out,
                   out_stride, eps, offset, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *rotary(PyObject *self, PyObject *args) {
    unsigned long long qk, positions, cos, sin;
    long rows, row_stride;
    int heads, head_dim, threads;
    if (!PyArg_ParseTuple(args, "KlliiKKKi", &qk, &rows, &row_stride, &heads, &head_dim, &positions, &cos, &sin,
                          &threads))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rotary_rows((uint16_t *)qk, rows, row_stride, heads, head_dim, (const int64_t *)positions, (const uint16_t *)cos,
                (const uint16_t *)sin, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *silu_and_mul(PyObject *self, PyObject *args) {
    unsigned long long gate_up, out;
    long rows, size;
    int threads;
    if (!PyArg_ParseTuple(args, "KKlli", &gate_up, &out, &rows, &size, &threads)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    silu_and_mul_rows((const uint16_t *)gate_up, (uint16_t *)out, rows, size, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"add_rms_norm", add_rms_norm, METH_VARARGS,
     "add_rms_norm(x, residual or 0, weight, out, residual_out, rows, size, eps, offset, threads)"},
    {"rms_norm_heads", rms_norm_heads_op, METH_VARARGS,
     "rms_norm_heads(x, rows, row_stride, heads, head_dim, weight, out, out_stride, eps, offset, threads): each head a row"},
    {"rotary", rotary, METH_VARARGS,
     "rotary(qk, rows, row_stride, heads, head_dim, positions, cos, sin, threads): in place"},
    {"silu_and_mul", silu_and_mul, METH_VARARGS, "silu_and_mul(gate_up, out, rows, size, threads)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_layer_ops",
                                    "Fused bf16 layer ops for the CPU backend.", -1, methods};

PyMODINIT_FUNC PyInit__layer_ops(void) { return PyModule_Create(&module); }
