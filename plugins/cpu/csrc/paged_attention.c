/*
 * Decode attention over the paged KV cache, for the CPU backend.
 *
 * One query token per sequence; keys and values are read straight from the cache blocks the block
 * table names (no gather into a padded copy). Each (sequence, kv head) pair is one work item: the
 * query heads grouped under that kv head share every key and value load. Scores, softmax and the
 * weighted sum are in float32 whatever the storage type. Built as a CPython extension by setup.py;
 * the GIL is released while it runs, and large batches are split over two threads.
 *
 * Layout: q, out (num_seqs, num_heads, head_dim); k_cache, v_cache (num_slots, num_kv_heads, head_dim)
 * with slot = block * block_size + offset; block_tables (num_seqs, table_stride) int32; seq_lens int32.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

enum { DTYPE_BF16 = 0, DTYPE_F32 = 1 };
#define MAX_GROUP 32
#define MAX_HEAD_DIM 256

typedef struct {
    const void *q, *k_cache, *v_cache;
    const int32_t *block_tables, *seq_lens;
    void *out;
    long table_stride;
    int num_heads, num_kv_heads, head_dim, block_size, window, dtype;
    float scale;
    long first_item, end_item; /* work items [first, end) of (seq * num_kv_heads + kv_head) */
    int failed;
} Job;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    bits += 0x7FFF + ((bits >> 16) & 1); /* round to nearest even */
    return (uint16_t)(bits >> 16);
}

static inline void load_row(const void *base, long index, int dtype, int n, float *dst) {
    if (dtype == DTYPE_BF16) {
        const uint16_t *src = (const uint16_t *)base + index;
        for (int i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
    } else {
        memcpy(dst, (const float *)base + index, (size_t)n * sizeof(float));
    }
}

/* Row of (position p, kv head) in the flat cache, through the sequence's block table. */
static inline long cache_row(const Job *job, const int32_t *table, int p, int kv_head) {
    return ((long)table[p / job->block_size] * job->block_size + p % job->block_size) * job->num_kv_heads + kv_head;
}

#ifdef __AVX512F__
/* 16 consecutive elements of a row as float32 lanes. */
static inline __m512 load16(const void *base, long index, int dtype) {
    if (dtype == DTYPE_BF16) {
        __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + index));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    return _mm512_loadu_ps((const float *)base + index);
}

#define MAX_VECS (MAX_HEAD_DIM / 16)


/* exp(x) for 16 lanes: x = n ln2 + y with |y| <= ln2 / 2, e^y by its Taylor series to degree 7 (relative
 * error under 1e-8), then scaled by 2^n. Scalar expf in the softmax cost as much as the dot products. */
static inline __m512 exp16(__m512 x) {
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

/* s[i] = exp(s[i] - max) in place; returns their sum. */
static inline float softmax_numerators(float *s, int span, float max) {
    const __m512 m = _mm512_set1_ps(max);
    __m512 sum = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= span; i += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), m));
        _mm512_storeu_ps(s + i, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (i < span) {
        const __mmask16 tail = (__mmask16)((1u << (span - i)) - 1);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + i), m));
        _mm512_mask_storeu_ps(s + i, tail, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
    }
    return _mm512_reduce_add_ps(sum);
}

/* One (sequence, kv head) work item, vectorised along the head dimension (head_dim % 16 == 0). */
static void attend_item_avx512(const Job *job, long seq, int kv_head, float *scores, int first, int span) {
    const int D = job->head_dim, G = job->num_heads / job->num_kv_heads, V = D / 16;
    const int32_t *table = job->block_tables + seq * job->table_stride;
    __m512 q[MAX_GROUP][MAX_VECS], acc[MAX_GROUP][MAX_VECS];
    float max_score[MAX_GROUP], total[MAX_GROUP];
    for (int g = 0; g < G; g++) {
        const long base = (seq * job->num_heads + (long)kv_head * G + g) * D;
        for (int j = 0; j < V; j++) q[g][j] = _mm512_mul_ps(load16(job->q, base + 16 * j, job->dtype),
                                                            _mm512_set1_ps(job->scale));
        max_score[g] = -INFINITY;
    }
    for (int i = 0; i < span; i++) {
        const long row = cache_row(job, table, first + i, kv_head);
        __m512 k[MAX_VECS];
        for (int j = 0; j < V; j++) k[j] = load16(job->k_cache, row * D + 16 * j, job->dtype);
        for (int g = 0; g < G; g++) {
            __m512 dot = _mm512_mul_ps(q[g][0], k[0]);
            for (int j = 1; j < V; j++) dot = _mm512_fmadd_ps(q[g][j], k[j], dot);
            const float score = _mm512_reduce_add_ps(dot);
            scores[(long)g * span + i] = score;
            if (score > max_score[g]) max_score[g] = score;
        }
    }
    for (int g = 0; g < G; g++) {
        total[g] = softmax_numerators(scores + (long)g * span, span, max_score[g]);
        for (int j = 0; j < V; j++) acc[g][j] = _mm512_setzero_ps();
    }
    for (int i = 0; i < span; i++) {
        const long row = cache_row(job, table, first + i, kv_head);
        __m512 v[MAX_VECS];
        for (int j = 0; j < V; j++) v[j] = load16(job->v_cache, row * D + 16 * j, job->dtype);
        for (int g = 0; g < G; g++) {
            const __m512 w = _mm512_set1_ps(scores[(long)g * span + i]);
            for (int j = 0; j < V; j++) acc[g][j] = _mm512_fmadd_ps(w, v[j], acc[g][j]);
        }
    }
    for (int g = 0; g < G; g++) {
        const long base = (seq * job->num_heads + (long)kv_head * G + g) * D;
        const __m512 inv = _mm512_set1_ps(1.f / total[g]);
        for (int j = 0; j < V; j++) {
            float lanes[16];
            _mm512_storeu_ps(lanes, _mm512_mul_ps(acc[g][j], inv));
            if (job->dtype == DTYPE_BF16) {
                uint16_t *dst = (uint16_t *)job->out + base + 16 * j;
                for (int l = 0; l < 16; l++) dst[l] = f32_to_bf16(lanes[l]);
            } else {
                memcpy((float *)job->out + base + 16 * j, lanes, sizeof lanes);
            }
        }
    }
}
#endif

static void *run_job(void *arg) {
    Job *job = (Job *)arg;
    const int D = job->head_dim, K = job->num_kv_heads, G = job->num_heads / job->num_kv_heads;
    float q[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM], row[MAX_HEAD_DIM];
    float *scores = NULL;
    long scores_capacity = 0;

    for (long item = job->first_item; item < job->end_item; item++) {
        const long seq = item / K;
        const int kv_head = (int)(item % K);
        const int seq_len = job->seq_lens[seq];
        const int first = job->window > 0 && seq_len > job->window ? seq_len - job->window : 0;
        const int span = seq_len - first;
        if ((long)span * G > scores_capacity) {
            free(scores);
            scores_capacity = (long)span * G * 2;
            scores = (float *)malloc((size_t)scores_capacity * sizeof(float));
            if (!scores) { job->failed = 1; return NULL; }
        }
#ifdef __AVX512F__
        if (D % 16 == 0) {
            attend_item_avx512(job, seq, kv_head, scores, first, span);
            continue;
        }
#endif
        for (int g = 0; g < G; g++)
            load_row(job->q, (seq * job->num_heads + (long)kv_head * G + g) * D, job->dtype, D, q[g]);

        const int32_t *table = job->block_tables + seq * job->table_stride;
        float max_score[MAX_GROUP];
        for (int g = 0; g < G; g++) max_score[g] = -INFINITY;
        for (int p = first; p < seq_len; p++) {
            load_row(job->k_cache, cache_row(job, table, p, kv_head) * D, job->dtype, D, row);
            for (int g = 0; g < G; g++) {
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int d = 0; d < D; d++) dot += q[g][d] * row[d];
                dot *= job->scale;
                scores[(long)g * span + (p - first)] = dot;
                if (dot > max_score[g]) max_score[g] = dot;
            }
        }
        float total[MAX_GROUP];
        for (int g = 0; g < G; g++) {
            float sum = 0.f;
            float *s = scores + (long)g * span;
            for (int i = 0; i < span; i++) {
                s[i] = expf(s[i] - max_score[g]);
                sum += s[i];
            }
            total[g] = sum;
            memset(acc[g], 0, (size_t)D * sizeof(float));
        }
        for (int p = first; p < seq_len; p++) {
            load_row(job->v_cache, cache_row(job, table, p, kv_head) * D, job->dtype, D, row);
            for (int g = 0; g < G; g++) {
                const float w = scores[(long)g * span + (p - first)];
#pragma omp simd
                for (int d = 0; d < D; d++) acc[g][d] += w * row[d];
            }
        }
        for (int g = 0; g < G; g++) {
            const long base = (seq * job->num_heads + (long)kv_head * G + g) * D;
            const float inv = 1.f / total[g];
            if (job->dtype == DTYPE_BF16) {
                uint16_t *dst = (uint16_t *)job->out + base;
                for (int d = 0; d < D; d++) dst[d] = f32_to_bf16(acc[g][d] * inv);
            } else {
                float *dst = (float *)job->out + base;
                for (int d = 0; d < D; d++) dst[d] = acc[g][d] * inv;
            }
        }
    }
    free(scores);
    return NULL;
}

/* Below this many (position x kv head) reads, a second thread costs more than it saves. */
#define PARALLEL_THRESHOLD 4096

static PyObject *decode_attention(PyObject *self, PyObject *args) {
    unsigned long long q, k_cache, v_cache, block_tables, seq_lens, out;
    long table_stride, num_seqs, total_positions;
    int num_heads, num_kv_heads, head_dim, block_size, window, dtype, threads;
    float scale;
    if (!PyArg_ParseTuple(args, "KKKKKKlliiiiiifli", &q, &k_cache, &v_cache, &block_tables, &seq_lens, &out,
                          &table_stride, &num_seqs, &num_heads, &num_kv_heads, &head_dim, &block_size, &window,
                          &dtype, &scale, &total_positions, &threads))
        return NULL;
    if (num_kv_heads <= 0 || num_heads % num_kv_heads || num_heads / num_kv_heads > MAX_GROUP ||
        head_dim > MAX_HEAD_DIM || (dtype != DTYPE_BF16 && dtype != DTYPE_F32)) {
        PyErr_SetString(PyExc_ValueError, "decode_attention: unsupported head layout or dtype");
        return NULL;
    }
    Job base = {(const void *)q, (const void *)k_cache, (const void *)v_cache, (const int32_t *)block_tables,
                (const int32_t *)seq_lens, (void *)out, table_stride, num_heads, num_kv_heads, head_dim,
                block_size, window, dtype, scale, 0, num_seqs * num_kv_heads, 0};
    const long items = num_seqs * num_kv_heads;
    const int workers = (threads > 1 && items > 1 && total_positions * num_kv_heads >= PARALLEL_THRESHOLD) ? 2 : 1;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    if (workers == 1) {
        run_job(&base);
        failed = base.failed;
    } else {
        /* Cut where half the positions are done, so long and short sequences balance. */
        Job halves[2] = {base, base};
        long split = items / 2, done = 0;
        for (long s = 0; s < num_seqs; s++) {
            done += ((const int32_t *)seq_lens)[s];
            if (2 * done >= total_positions) {
                split = (s + 1) * num_kv_heads;
                break;
            }
        }
        if (split >= items) split = items / 2; /* one sequence: its kv heads are the halves */
        halves[0].end_item = split;
        halves[1].first_item = split;
        pthread_t helper;
        if (pthread_create(&helper, NULL, run_job, &halves[1]) != 0) {
            halves[0].end_item = items;
            run_job(&halves[0]);
        } else {
            run_job(&halves[0]);
            pthread_join(helper, NULL);
        }
        failed = halves[0].failed || halves[1].failed;
    }
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_attention", decode_attention, METH_VARARGS,
     "decode_attention(q, k_cache, v_cache, block_tables, seq_lens, out, table_stride, num_seqs, num_heads, "
     "num_kv_heads, head_dim, block_size, window, dtype, scale, total_positions, threads): data pointers "
     "of contiguous tensors; writes out."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_paged_attention",
                                    "Paged decode attention for the CPU backend.", -1, methods};

PyMODINIT_FUNC PyInit__paged_attention(void) { return PyModule_Create(&module); }
