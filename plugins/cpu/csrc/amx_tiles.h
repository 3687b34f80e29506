/*
 * AMX tile state shared by the kernels that use the tiles (amx_gemm.h's linears, attention_kernels.h's
 * decode attention): whether this process may use them, and the tile configuration record.
 *
 * Linux hands out AMX's 8 KiB of tile state per process on request (arch_prctl ARCH_REQ_XCOMP_PERM);
 * `amx_usable` asks once. TOKENMILL_CPU_AMX=0 keeps a process off the tiles.
 */
#ifndef TOKENMILL_AMX_TILES_H
#define TOKENMILL_AMX_TILES_H

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__) && defined(__AVX512BF16__)
#define HAVE_AMX_TILES 1
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define AMX_TILE_ROWS 16 /* rows of an A tile, input pairs of a B tile */

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} AmxTileConfig;

/* -1 not decided yet: TOKENMILL_CPU_AMX decides on first use, `amx_want` for a test or a benchmark. */
static int amx_wanted = -1;
static int amx_permitted = -1; /* -1 not asked yet; 0 no AMX, or the kernel refused its tile state */

static inline void amx_want(int wanted) { amx_wanted = wanted; }

static inline int amx_usable(void) {
    if (amx_wanted < 0) {
        const char *env = getenv("TOKENMILL_CPU_AMX");
        amx_wanted = !(env && env[0] == '0');
    }
    if (!amx_wanted) return 0;
    if (amx_permitted < 0) amx_permitted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return amx_permitted;
}

/* Tile t as `rows` rows of `colsb` bytes in the configuration being built. */
static inline void amx_shape(AmxTileConfig *cfg, int t, int rows, int colsb) {
    cfg->rows[t] = (uint8_t)rows;
    cfg->colsb[t] = (uint16_t)colsb;
}
#else
#define HAVE_AMX_TILES 0
#endif

#ifdef Py_PYTHON_H
/* An extension's `amx()` and `set_amx(wanted)`: each extension holds its own switch (a test's or a benchmark's;
 * TOKENMILL_CPU_AMX=0 is the process's). */
static PyObject *amx_py_usable(PyObject *self, PyObject *args) {
#if HAVE_AMX_TILES
    return PyBool_FromLong(amx_usable());
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *amx_py_want(PyObject *self, PyObject *args) {
    int wanted;
    if (!PyArg_ParseTuple(args, "p", &wanted)) return NULL;
#if HAVE_AMX_TILES
    amx_want(wanted);
#endif
    return amx_py_usable(self, NULL);
}
#endif

#endif
