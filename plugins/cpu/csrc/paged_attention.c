/*
 * Paged decode attention (attention_kernels.h) as a CPython extension: arguments are data pointers of
 * contiguous tensors the Python side (kernels.py) has checked.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "attention_kernels.h"

static PyObject *decode_attention(PyObject *self, PyObject *args) {
    unsigned long long q, k_cache, v_cache, block_tables, seq_lens, out;
    long table_stride, num_seqs, total_positions;
    int num_heads, num_kv_heads, head_dim, block_size, window, dtype, threads, kv_dtype;
    float scale;
    if (!PyArg_ParseTuple(args, "KKKKKKlliiiiiiflii", &q, &k_cache, &v_cache, &block_tables, &seq_lens, &out,
                          &table_stride, &num_seqs, &num_heads, &num_kv_heads, &head_dim, &block_size, &window,
                          &dtype, &scale, &total_positions, &threads, &kv_dtype))
        return NULL;
    if (num_kv_heads <= 0 || num_heads % num_kv_heads || num_heads / num_kv_heads > MAX_GROUP ||
        head_dim > MAX_HEAD_DIM || block_size <= 0 || (dtype != DTYPE_BF16 && dtype != DTYPE_F32) ||
        kv_dtype < DTYPE_BF16 || kv_dtype > DTYPE_FP8_E5M2 || (kv_dtype == DTYPE_F32 && dtype != DTYPE_F32)) {
        PyErr_SetString(PyExc_ValueError, "decode_attention: unsupported head layout or dtype");
        return NULL;
    }
    const Job job = {(const void *)q, (const void *)k_cache, (const void *)v_cache, (const int32_t *)block_tables,
                     (const int32_t *)seq_lens, (void *)out, table_stride, num_heads, num_kv_heads, head_dim,
                     block_size, window, dtype, scale, kv_dtype};
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = decode_attention_run(&job, num_seqs, total_positions, threads);
    Py_END_ALLOW_THREADS
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_attention", decode_attention, METH_VARARGS,
     "decode_attention(q, k_cache, v_cache, block_tables, seq_lens, out, table_stride, num_seqs, num_heads, "
     "num_kv_heads, head_dim, block_size, window, dtype, scale, total_positions, threads, kv_dtype): data "
     "pointers of contiguous tensors; writes out."},
    {"amx", amx_py_usable, METH_NOARGS, "amx(): whether bf16 caches of head size 64 are attended on AMX tiles."},
    {"set_amx", amx_py_want, METH_VARARGS,
     "set_amx(wanted): take the tiles where they can serve, or not (a test's or a benchmark's switch; "
     "TOKENMILL_CPU_AMX=0 is the process's); returns amx()."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_paged_attention",
                                    "Paged decode attention for the CPU backend.", -1, methods};

PyMODINIT_FUNC PyInit__paged_attention(void) { return PyModule_Create(&module); }
