/*
 * The dense bf16 linear on AMX tiles (Sapphire Rapids and later Xeons), for many rows of x.
 *
 * One `tdpbf16ps` multiplies a 16 x 32 bf16 tile of x by a 32 x 16 tile of W into 16 x 16 float32
 * accumulators: 8,192 multiply-adds, where `vdpbf16ps` does 32. The dense layout of gemm_kernels.h is
 * already AMX's B-tile layout: a panel's 16 consecutive input pairs of 16 outputs x 2 inputs are one
 * 16-row, 64-byte-wide tile, so the same packed weight serves both kernels. x is read as A tiles in place,
 * 16 rows by 32 inputs; the rows past the last full 32 come from a zero-padded copy.
 *
 * Each output is the float32 sum of its products, input pair by input pair in order, rounded to bf16 once,
 * as the AVX512-BF16 kernel computes it, and a row's result does not depend on the rows beside it.
 *
 * Linux hands out AMX's 8 KiB of tile state per process on request (arch_prctl ARCH_REQ_XCOMP_PERM);
 * `amx_usable` asks once. TOKENMILL_CPU_AMX=0 keeps a process on the AVX512-BF16 kernel.
 */
#ifndef TOKENMILL_AMX_GEMM_H
#define TOKENMILL_AMX_GEMM_H

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && HAVE_BF16_GEMM
#define HAVE_AMX_GEMM 1
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define AMX_TILE_ROWS 16 /* rows of x in an A tile, input pairs in a B tile */
#define AMX_CHUNK_ROWS 32 /* rows of x per pass over a work item's weights: two A tiles */

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} AmxTileConfig;

/* -1 not decided yet: TOKENMILL_CPU_AMX decides on first use, `amx_want` for a test or a benchmark. */
static int amx_wanted = -1;
static int amx_permitted = -1; /* -1 not asked yet; 0 no AMX, or the kernel refused its tile state */

static void amx_want(int wanted) { amx_wanted = wanted; }

static int amx_usable(void) {
    if (amx_wanted < 0) {
        const char *env = getenv("TOKENMILL_CPU_AMX");
        amx_wanted = !(env && env[0] == '0');
    }
    if (!amx_wanted) return 0;
    if (amx_permitted < 0) amx_permitted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return amx_permitted;
}

/* Tiles 0-3 accumulate (A row tile 0 or 1 x panel 0 or 1), 4-5 hold x, 6-7 the two weight panels. */
static void amx_configure(void) {
    AmxTileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = AMX_TILE_ROWS;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* Accumulator tile `tile` (16 rows x 16 float32) to bf16 outputs of panel v, rows m0 .. m0+rows-1. */
#define AMX_STORE(tile, v, m0, rows)                                                                 \
    do {                                                                                             \
        float acc_[AMX_TILE_ROWS][16];                                                               \
        _tile_stored(tile, acc_, 64);                                                                \
        const long left_ = g->n - (v) * 16;                                                          \
        const __mmask16 mask_ = left_ >= 16 ? 0xFFFF : (__mmask16)((1u << left_) - 1);               \
        for (long r_ = 0; r_ < (rows); r_++)                                                         \
            _mm256_mask_storeu_epi16(g->y + ((m0) + r_) * g->y_stride + (v) * 16, mask_,             \
                                     (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(acc_[r_])));        \
    } while (0)

/* Rows m0 .. m0+rows-1 (rows <= 32) of x, read from `x` with `x_stride`, against panels v0 and v0+1 (the
 * second only when nv is 2). */
static inline void amx_chunk(const Gemm *g, const uint16_t *x, long x_stride, long v0, int nv, long m0, long rows) {
    const uint16_t *w0 = (const uint16_t *)g->w + v0 * g->k_pairs * 32;
    const uint16_t *w1 = nv > 1 ? w0 + g->k_pairs * 32 : w0;
    const int two = rows > AMX_TILE_ROWS;
    const long x_bytes = x_stride * 2;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (long p = 0; p < g->k_pairs; p += AMX_TILE_ROWS) {
        _tile_loadd(6, w0 + p * 32, 64);
        _tile_loadd(7, w1 + p * 32, 64);
        _tile_loadd(4, x + p * 2, x_bytes);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two) {
            _tile_loadd(5, x + AMX_TILE_ROWS * x_stride + p * 2, x_bytes);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    const long first = rows < AMX_TILE_ROWS ? rows : AMX_TILE_ROWS;
    AMX_STORE(0, v0, m0, first);
    if (nv > 1) AMX_STORE(1, v0 + 1, m0, first);
    if (two) {
        AMX_STORE(2, v0, m0 + AMX_TILE_ROWS, rows - AMX_TILE_ROWS);
        if (nv > 1) AMX_STORE(3, v0 + 1, m0 + AMX_TILE_ROWS, rows - AMX_TILE_ROWS);
    }
}

/* y = x @ W^T for dense W on the tiles: 1 done, 0 out of memory, -1 not for this call (no AMX, or inputs
 * not a multiple of 32), where the AVX512-BF16 kernel runs instead. At every row count, even one (where
 * both kernels wait on memory and take the same time), so a row's result never depends on its batch. */
static int amx_dense_linear(const Gemm *g, int threads) {
    if (g->k_pairs % AMX_TILE_ROWS || !amx_usable()) return -1;
    const long full = g->m / AMX_CHUNK_ROWS * AMX_CHUNK_ROWS, tail = g->m - full;
    uint16_t *padded = NULL;
    if (tail) {  /* the last rows, zero-padded to a whole chunk, so every tile load is in bounds */
        padded = calloc((size_t)(AMX_CHUNK_ROWS * g->k_pairs * 2), sizeof(uint16_t));
        if (!padded) return 0;
        for (long r = 0; r < tail; r++)
            memcpy(padded + r * g->k_pairs * 2, g->x + (full + r) * g->x_stride, (size_t)g->k_pairs * 4);
    }
    const long panels = num_panels(g), items = (panels + PANELS_PER_BLOCK - 1) / PANELS_PER_BLOCK;
    const int workers = g->m * g->n * g->k_pairs * 2 >= GEMM_PARALLEL_THRESHOLD && threads > 1 ? threads : 1;
#pragma omp parallel num_threads(workers)
    {
        amx_configure();
#pragma omp for schedule(static)
        for (long item = 0; item < items; item++) {
            const long v0 = item * PANELS_PER_BLOCK;
            const int nv = panels - v0 < PANELS_PER_BLOCK ? (int)(panels - v0) : PANELS_PER_BLOCK;
            for (long m0 = 0; m0 < full; m0 += AMX_CHUNK_ROWS)
                amx_chunk(g, g->x + m0 * g->x_stride, g->x_stride, v0, nv, m0, AMX_CHUNK_ROWS);
            if (tail) amx_chunk(g, padded, g->k_pairs * 2, v0, nv, full, tail);
        }
        _tile_release();
    }
    free(padded);
    return 1;
}
#else
#define HAVE_AMX_GEMM 0
#endif

#endif
