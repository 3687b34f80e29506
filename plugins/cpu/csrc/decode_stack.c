/*
 * A whole decode step of a Llama-family decoder stack in one call, for the CPU backend.
 *
 * At one token a step runs ~300 small kernels; dispatching each from Python (module calls, tensor
 * allocation, argument checks) cost ~200 us a layer, half of a batch-1 step. This file chains the
 * same kernels (gemm_kernels.h, layer_kernels.h, attention_kernels.h) over every layer in C, with
 * the same arguments the Python path gives them, so the hidden states are bit-identical to the
 * module-by-module forward (tests/foundation/test_decode_stack.py checks it).
 *
 * Per layer: add + RMSNorm, fused QKV projection (plus its bias, Qwen2's), RMSNorm of each query and key
 * head (Qwen3's), rotary on queries and keys, the new keys and values written to their cache slots,
 * paged decode attention (over the last `window` positions where every layer slides one, Mistral's; 0: all),
 * output projection, add + RMSNorm, fused gate/up projection, SiLU-and-multiply, down projection; then the
 * final norm. Each row is one query
 * token with a block table and context length of its own: a plain decode step has a row per sequence,
 * a verification step (speculative decoding) a row per fed token, each attending up to its own
 * position (decode_stack.py builds the per-row tables). All keys and values are written before any
 * row attends, and every kernel computes a row alone, so a row's result does not depend on the rows
 * beside it. decode_stack.py takes longer queries to the module-by-module forward.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "attention_kernels.h"
#include "gemm_kernels.h"
#include "layer_kernels.h"

/* The step's work space (about 1 MB at 64 rows), kept from one call to the next: allocated afresh, glibc
 * hands it back to the kernel on free, and every step then faulted in and zeroed a new huge page (2-3 %
 * of a 64-stream step). A call that finds it taken (a second thread stepping) gets one of its own. */
static uint16_t *kept_arena;
static long kept_elements;
static int arena_taken;

static uint16_t *take_arena(long elements) {
    if (__atomic_exchange_n(&arena_taken, 1, __ATOMIC_ACQUIRE))
        return aligned_alloc(64, (size_t)elements * sizeof(uint16_t));
    if (elements > kept_elements) {
        free(kept_arena);
        kept_arena = aligned_alloc(64, (size_t)elements * sizeof(uint16_t));
        kept_elements = kept_arena ? elements : 0;
    }
    if (!kept_arena) __atomic_store_n(&arena_taken, 0, __ATOMIC_RELEASE);
    return kept_arena;
}

static void give_back_arena(uint16_t *arena) {
    if (arena == kept_arena)
        __atomic_store_n(&arena_taken, 0, __ATOMIC_RELEASE);
    else
        free(arena);
}

/* One linear layer: the weight and GEMM_ format below ggml_max_rows rows, those from there (a GGUF's blocks,
 * then their dense copy or the blocks on AMX tiles; one weight and format twice for others), out and in
 * features. */
typedef struct {
    int64_t few_rows, few_rows_format, many_rows, many_rows_format, out_features, in_features;
} LinearPlan;

/* One decoder layer, as decode_stack.py lays it out in an int64 tensor (pointers and sizes). The fused
 * projection's bias (Qwen2) and the per-head query and key norms (Qwen3) are 0 where the model has none. */
typedef struct {
    int64_t input_norm, post_norm;
    LinearPlan qkv, o, gate_up, down;
    int64_t qkv_bias, q_norm, k_norm;
} LayerPlan;

typedef struct {
    long rows, decode_rows, hidden, num_heads, num_kv_heads, head_dim, intermediate, ggml_max_rows;
    int threads;
} Shape;

/* `count` rows of x through the linear, by the kernel it takes at `kernel_rows` rows. */
static int linear_rows(const LinearPlan *p, const Shape *s, const uint16_t *x, uint16_t *y, long count,
                       long kernel_rows) {
    const int many = kernel_rows >= s->ggml_max_rows;
    return gemm_linear((int)(many ? p->many_rows_format : p->few_rows_format),
                       x, (const void *)(many ? p->many_rows : p->few_rows), y, count, p->out_features,
                       p->in_features / 2, p->in_features, p->out_features, s->threads);
}

/* The decode rows (the leading decode_rows) by the kernel for their count, the prompt rows after them by the
 * many-row kernel, as quant.py's PackedBF16Linear.matmul splits them (tokenmill.batch_rows). */
static int run_linear(const LinearPlan *p, const Shape *s, const uint16_t *x, uint16_t *y) {
    const long decodes = s->decode_rows;
    int ok = 1;
    if (decodes) ok &= linear_rows(p, s, x, y, decodes, decodes);
    if (s->rows > decodes)
        ok &= linear_rows(p, s, x + decodes * p->in_features, y + decodes * p->out_features, s->rows - decodes,
                          s->ggml_max_rows);
    return ok;
}

/* Keys and values of this step's tokens into their slots of the head-major cache blocks: copied as bf16, or
 * quantized row by row (attention_kernels.h) in a one-byte kv_dtype. */
static void write_cache(const Shape *s, const uint16_t *qkv, long qkv_stride, const int64_t *slots, long block_size,
                        void *k_cache, void *v_cache, int kv_dtype) {
    const long q_size = s->num_heads * s->head_dim, kv_size = s->num_kv_heads * s->head_dim;
    const int quantized = IS_QUANTIZED(kv_dtype);
    const size_t row_bytes = quantized ? (size_t)(s->head_dim + SCALE_BYTES) : (size_t)s->head_dim * sizeof(uint16_t);
    for (long t = 0; t < s->rows; t++) {
        const long block = slots[t] / block_size, offset = slots[t] % block_size;
        for (long h = 0; h < s->num_kv_heads; h++) {
            const size_t at = (size_t)((block * s->num_kv_heads + h) * block_size + offset) * row_bytes;
            const uint16_t *key = qkv + t * qkv_stride + q_size + h * s->head_dim, *value = key + kv_size;
            if (quantized) {
                quantize_row(key, (int)s->head_dim, kv_dtype, (uint8_t *)k_cache + at);
                quantize_row(value, (int)s->head_dim, kv_dtype, (uint8_t *)v_cache + at);
            } else {
                memcpy((uint8_t *)k_cache + at, key, row_bytes);
                memcpy((uint8_t *)v_cache + at, value, row_bytes);
            }
        }
    }
}

static PyObject *decode(PyObject *self, PyObject *args) {
    unsigned long long hidden_in, out, plan_ptr, caches_ptr, final_norm, positions, slots, block_tables, seq_lens,
        cos, sin;
    long num_layers, table_stride, block_size, total_positions;
    float eps, scale;
    int kv_dtype, window;
    Shape s;
    if (!PyArg_ParseTuple(args, "KKKKlKllllllllfKKKKlllKKfiii", &hidden_in, &out, &plan_ptr, &caches_ptr, &num_layers,
                          &final_norm, &s.rows, &s.decode_rows, &s.hidden, &s.num_heads, &s.num_kv_heads, &s.head_dim,
                          &s.intermediate, &s.ggml_max_rows, &eps, &positions, &slots, &block_tables, &seq_lens,
                          &table_stride, &block_size, &total_positions, &cos, &sin, &scale, &s.threads, &kv_dtype,
                          &window))
        return NULL;
#if HAVE_BF16_GEMM
    if (s.num_heads % s.num_kv_heads || s.num_heads / s.num_kv_heads > MAX_GROUP || s.head_dim > MAX_HEAD_DIM ||
        s.head_dim % 2 || (kv_dtype != DTYPE_BF16 && !IS_QUANTIZED(kv_dtype)) || kv_dtype > DTYPE_FP8_E5M2) {
        PyErr_SetString(PyExc_ValueError, "decode_stack: unsupported head layout");
        return NULL;
    }
    const LayerPlan *plan = (const LayerPlan *)plan_ptr;
    const int64_t *caches = (const int64_t *)caches_ptr; /* per layer: key blocks, value blocks */
    const long rows = s.rows, q_size = s.num_heads * s.head_dim;
    const long qkv_size = q_size + 2 * s.num_kv_heads * s.head_dim;
    /* Work space: residual, normed, layer output, qkv, contiguous queries, attention out, gate/up, act. */
    const long sizes[] = {s.hidden, s.hidden, s.hidden, qkv_size, q_size, q_size, 2 * s.intermediate, s.intermediate};
    uint16_t *buffers[8];
    long lengths[8], total = 0;
    for (int i = 0; i < 8; i++) { /* each rounded up to 64 bytes: every buffer starts on a cache line */
        lengths[i] = (rows * sizes[i] + 31) / 32 * 32;
        total += lengths[i];
    }
    uint16_t *arena = take_arena(total);
    if (!arena) return PyErr_NoMemory();
    for (long i = 0, at = 0; i < 8; at += lengths[i], i++) buffers[i] = arena + at;
    uint16_t *residual = buffers[0], *normed = buffers[1], *hidden = buffers[2], *qkv = buffers[3], *query = buffers[4],
             *attended = buffers[5], *gate_up = buffers[6], *act = buffers[7];
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    memcpy(residual, (const void *)hidden_in, (size_t)(rows * s.hidden) * sizeof(uint16_t));
    for (long l = 0; l < num_layers && ok; l++) {
        const LayerPlan *p = &plan[l];
        void *k_cache = (void *)caches[2 * l], *v_cache = (void *)caches[2 * l + 1];
        if (l == 0)
            add_rms_norm_rows(residual, NULL, (const uint16_t *)p->input_norm, normed, NULL, rows, s.hidden, eps, 0.f,
                              s.threads);
        else
            add_rms_norm_rows(hidden, residual, (const uint16_t *)p->input_norm, normed, residual, rows, s.hidden, eps,
                              0.f, s.threads);
        ok &= run_linear(&p->qkv, &s, normed, qkv);
        if (p->qkv_bias) add_bias_rows(qkv, (const uint16_t *)p->qkv_bias, rows, qkv_size);
        if (p->q_norm) { /* in place, before RoPE, as LlamaAttention.forward normalises q and k */
            rms_norm_heads(qkv, rows, qkv_size, s.num_heads, s.head_dim, (const uint16_t *)p->q_norm, qkv, qkv_size,
                           eps, 0.f, s.threads);
            rms_norm_heads(qkv + q_size, rows, qkv_size, s.num_kv_heads, s.head_dim, (const uint16_t *)p->k_norm,
                           qkv + q_size, qkv_size, eps, 0.f, s.threads);
        }
        rotary_rows(qkv, rows, qkv_size, (int)(s.num_heads + s.num_kv_heads), (int)s.head_dim,
                    (const int64_t *)positions, (const uint16_t *)cos, (const uint16_t *)sin, s.threads);
        write_cache(&s, qkv, qkv_size, (const int64_t *)slots, block_size, k_cache, v_cache, kv_dtype);
        for (long t = 0; t < rows; t++)
            memcpy(query + t * q_size, qkv + t * qkv_size, (size_t)q_size * sizeof(uint16_t));
        const Job job = {query, k_cache, v_cache, (const int32_t *)block_tables, (const int32_t *)seq_lens, attended,
                         table_stride, (int)s.num_heads, (int)s.num_kv_heads, (int)s.head_dim, (int)block_size, window,
                         DTYPE_BF16, scale, kv_dtype};
        ok &= decode_attention_run(&job, rows, total_positions, s.threads);
        ok &= run_linear(&p->o, &s, attended, hidden);
        add_rms_norm_rows(hidden, residual, (const uint16_t *)p->post_norm, normed, residual, rows, s.hidden, eps, 0.f,
                          s.threads);
        ok &= run_linear(&p->gate_up, &s, normed, gate_up);
        silu_and_mul_rows(gate_up, act, rows, s.intermediate, s.threads);
        ok &= run_linear(&p->down, &s, act, hidden);
    }
    if (ok)
        add_rms_norm_rows(hidden, residual, (const uint16_t *)final_norm, (uint16_t *)out, residual, rows, s.hidden,
                          eps, 0.f, s.threads);
    Py_END_ALLOW_THREADS
    give_back_arena(arena);
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_RuntimeError, "decode_stack needs a build with AVX512-BF16");
    return NULL;
#endif
}

static PyObject *available(PyObject *self, PyObject *args) { return PyBool_FromLong(HAVE_BF16_GEMM); }

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS,
     "decode(hidden, out, plan, caches, num_layers, final_norm, rows, decode_rows, hidden_size, num_heads, "
     "num_kv_heads, head_dim, intermediate, ggml_max_rows, eps, positions, slots, block_tables, seq_lens, table_stride, "
     "block_size, total_positions, cos, sin, scale, threads, kv_dtype): one decode step over every layer; "
     "data pointers of bf16 tensors (positions, slots int64; block tables, seq_lens int32; the caches bf16 or "
     "the one-byte kv_dtype); writes out."},
    {"available", available, METH_NOARGS, "Whether this build has the AVX512-BF16 kernels."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_decode_stack",
                                    "Whole decode steps of a Llama-family decoder stack for the CPU backend.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__decode_stack(void) { return PyModule_Create(&module); }
