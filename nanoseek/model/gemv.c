/* y = x Wᵀ (+ b) for a few rows of x, weights read once at memory speed (AVX2 + FMA), for bf16 and
 * fp32 weights.
 *
 * Built by nanoseek/model/gemv.py (gcc -O3 -mavx2 -mfma -fopenmp, loaded with ctypes into a process
 * that has imported torch, so `omp parallel` runs on torch's own OpenMP runtime and thread count).
 *
 * Why: a decode step at batch 1 is a chain of matrix-vector products, and its speed limit is
 * reading every weight once. On an AVX2 CPU without native bf16 instructions, torch's bf16
 * F.linear at one row reads at ~55-65 % of what a plain sum over memory reads (issue 13's profile);
 * here a bf16 value becomes an fp32 one by a 16-bit shift, so the loop is loads, shifts and FMAs:
 * 4 weight rows at a time (4 independent accumulators and memory streams), x converted to fp32 once.
 * fp32 weights take the same loop without the shift: MKL's sgemm at 1-2 rows runs the small
 * models' decode shapes (320 -> 96 ... 768) at ~4 GB/s of weights, packing the weight every call.
 *
 * x [M, K] (rows contiguous, stride ldx), w [N, K] (row stride ldw), b [N] or NULL, y [M, N]
 * (stride ldy), all of one dtype (bf16 or fp32). fp32 accumulation; bf16 results get one rounding
 * (nearest even), as F.linear.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

#define MAX_ROWS 8       /* rows of x in registers at once; more rows go through many_rows */

static inline __m256 load8(const uint16_t *p) {            /* 8 bf16 -> 8 fp32 */
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

static inline float to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf16(float f) {                   /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* element i of a row of dtype BF (1: bf16, 0: fp32) as fp32, and 8 of them */
static inline __attribute__((always_inline)) float elem(const void *p, int64_t i, int BF) {
    return BF ? to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline __attribute__((always_inline)) __m256 load8_any(const void *p, int64_t i, int BF) {
    return BF ? load8((const uint16_t *)p + i) : _mm256_loadu_ps((const float *)p + i);
}

/* R weight rows (from n) against M x rows; M, R, BF (weight and bias dtype) and YF (y is fp32,
 * else bf16) are constants at every call site, so the accumulators stay in registers
 * (M·R + R + 1 <= 16 ymm). While it reads its rows it prefetches the
 * next block's (one cache line per row every 32 values): the hardware prefetcher restarts on every
 * short row, and this took one row of 1536 values from 6.0-6.6 to 7.2 GB/s with 1 thread and from
 * 11.1-11.9 to 13.2-13.4 with 2 (8960 x 1536 bf16; 8 rows a block without it: 6.6-6.9 and 12.4-12.6). */
static inline __attribute__((always_inline)) void block(
        int M, int R, const float *xf, int64_t K, const void *w, int64_t ldw, int64_t n, int64_t N,
        const void *b, void *y, int64_t ldy, int BF, int YF) {
    __m256 acc[MAX_ROWS][4];
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) acc[m][r] = _mm256_setzero_ps();
    const int64_t row0 = n * ldw;
    const int step = BF ? 32 : 16;                          /* values per cache line */
    const int prefetch = n + 2 * R <= N;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[4];
        if (prefetch && (k & (step - 1)) == 0)
            for (int r = 0; r < R; r++)
                _mm_prefetch(BF ? (const char *)((const uint16_t *)w + row0 + (R + r) * ldw + k)
                                : (const char *)((const float *)w + row0 + (R + r) * ldw + k), _MM_HINT_T0);
        for (int r = 0; r < R; r++) wv[r] = load8_any(w, row0 + r * ldw + k, BF);
        for (int m = 0; m < M; m++) {
            __m256 xv = _mm256_loadu_ps(xf + m * K + k);
            for (int r = 0; r < R; r++) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) {
            float s = hsum(acc[m][r]);
            for (int64_t t = k; t < K; t++) s += elem(w, row0 + r * ldw + t, BF) * xf[m * K + t];
            if (b) s += elem(b, n + r, BF);
            if (YF) ((float *)y)[m * ldy + n + r] = s;
            else ((uint16_t *)y)[m * ldy + n + r] = to_bf16(s);
        }
}

#define ROWS_LOOP(M, R, BF, YF)                                                                   \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                             \
    for (int64_t i = 0; i < N / R; i++) block(M, R, xf, K, w, ldw, i * R, N, b, y, ldy, BF, YF);  \
    for (int64_t n = N / R * R; n < N; n++) block(M, 1, xf, K, w, ldw, n, N, b, y, ldy, BF, YF);

/* More than 8 rows (a short prefill): each weight row is read from memory once and used by every
 * chunk of 8 rows of x while it sits in L1. */
static inline __attribute__((always_inline)) void many_rows(
        const float *xf, int64_t M, int64_t K, const void *w, int64_t ldw, int64_t N, const void *b,
        void *y, int64_t ldy, int threads, int BF, int YF) {
    const int ysize = YF ? 4 : 2;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        int64_t m0 = 0;
        for (; m0 + 8 <= M; m0 += 8)
            block(8, 1, xf + m0 * K, K, w, ldw, n, N, b, (char *)y + m0 * ldy * ysize, ldy, BF, YF);
        const float *xr = xf + m0 * K;
        void *yr = (char *)y + m0 * ldy * ysize;
        switch (M - m0) {
            case 1: block(1, 1, xr, K, w, ldw, n, N, b, yr, ldy, BF, YF); break;
            case 2: block(2, 1, xr, K, w, ldw, n, N, b, yr, ldy, BF, YF); break;
            case 3: block(3, 1, xr, K, w, ldw, n, N, b, yr, ldy, BF, YF); break;
            case 4: block(4, 1, xr, K, w, ldw, n, N, b, yr, ldy, BF, YF); break;
            case 5: block(5, 1, xr, K, w, ldw, n, N, b, yr, ldy, BF, YF); break;
            case 6: block(6, 1, xr, K, w, ldw, n, N, b, yr, ldy, BF, YF); break;
            case 7: block(7, 1, xr, K, w, ldw, n, N, b, yr, ldy, BF, YF); break;
            default: break;
        }
    }
}

/* y = xf Wᵀ + b with xf already fp32 [M, K] contiguous */
static inline __attribute__((always_inline)) void product(
        const float *xf, int64_t M, int64_t K, const void *w, int64_t ldw, int64_t N, const void *b,
        void *y, int64_t ldy, int threads, int BF, int YF) {
    switch (M) {
        case 1: { ROWS_LOOP(1, 4, BF, YF) } break;
        case 2: { ROWS_LOOP(2, 4, BF, YF) } break;
        case 3: { ROWS_LOOP(3, 2, BF, YF) } break;
        case 4: { ROWS_LOOP(4, 2, BF, YF) } break;
        case 5: { ROWS_LOOP(5, 1, BF, YF) } break;
        case 6: { ROWS_LOOP(6, 1, BF, YF) } break;
        case 7: { ROWS_LOOP(7, 1, BF, YF) } break;
        case 8: { ROWS_LOOP(8, 1, BF, YF) } break;
        default: many_rows(xf, M, K, w, ldw, N, b, y, ldy, threads, BF, YF); break;
    }
}

/* x rows (dtype bf) -> fp32 [M, K] */
static float *widen(const void *x, int64_t ldx, int64_t M, int64_t K, int bf) {
    float *xf = (float *)malloc(sizeof(float) * (M * K + 1));
    if (!xf) return NULL;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++)
            xf[m * K + k] = bf ? to_f32(((const uint16_t *)x)[m * ldx + k]) : ((const float *)x)[m * ldx + k];
    return xf;
}

/* bf: x, w, b and y are bf16 (else fp32). `threads`: the caller's torch.get_num_threads() (OpenMP's
 * per-thread setting may differ in the thread that calls). Returns 0, or -1 when M < 1 or memory
 * runs out. */
int nanoseek_gemv(const void *x, int64_t ldx, const void *w, int64_t ldw, const void *b, void *y, int64_t ldy,
                  int64_t M, int64_t N, int64_t K, int bf, int threads) {
    if (M < 1) return -1;
    float *xf = widen(x, ldx, M, K, bf);
    if (!xf) return -1;
    if (bf) product(xf, M, K, w, ldw, N, b, y, ldy, threads, 1, 0);   /* constant BF, YF: one copy each */
    else product(xf, M, K, w, ldw, N, b, y, ldy, threads, 0, 1);
    free(xf);
    return 0;
}

/* ---------------------------------------------------------------- fp32 GEMM on pre-packed weights
 * y [M, N] = x [M, K] Wᵀ (+ b) for a few rows of x (a decode step's batch), W [N, K] fp32 packed once
 * (nanoseek_pack16) into panels of PANEL output columns, each panel K rows of PANEL contiguous values
 * (the last one zero-padded). A panel is read from memory once and used by every chunk of 6 rows of x
 * from L1: 6 x 16 outputs in 12 ymm accumulators, 2 weight loads and 6 broadcasts per 12 FMAs.
 *
 * Why: MKL's sgemm packs the weight on every call. At decode sizes (1-32 rows, K = 256-1024) on this
 * machine it ran at 4-30 GFLOP/s and read its weights at 3-10 GB/s (model/packed.py has the table).
 *
 * Every chunk prefetches (into L2) its share of the next panel's lines, spread evenly over the
 * chunks: with only the first chunk reading memory, memory sat idle while the others computed from
 * L1 (256 -> 2048 at 16 rows: 341 µs with the next panel fetched by the second chunk alone, 271
 * spread; `/tmp/e16/mb4.py`). */
#define PANEL 16

void nanoseek_pack16(const float *w, int64_t ldw, float *p, int64_t N, int64_t K) {
    for (int64_t n0 = 0; n0 < N; n0 += PANEL) {
        float *pp = p + n0 * K;
        const int64_t nn = N - n0 < PANEL ? N - n0 : PANEL;
        for (int64_t k = 0; k < K; k++) {
            for (int64_t j = 0; j < nn; j++) pp[k * PANEL + j] = w[(n0 + j) * ldw + k];
            for (int64_t j = nn; j < PANEL; j++) pp[k * PANEL + j] = 0.f;
        }
    }
}

static inline __attribute__((always_inline)) void store_row(float *y, __m256 v0, __m256 v1, __m256 c0, __m256 c1,
                                                            int64_t nn) {
    v0 = _mm256_add_ps(v0, c0);
    v1 = _mm256_add_ps(v1, c1);
    if (nn == PANEL) {
        _mm256_storeu_ps(y, v0);
        _mm256_storeu_ps(y + 8, v1);
        return;
    }
    float t[PANEL];
    _mm256_storeu_ps(t, v0);
    _mm256_storeu_ps(t + 8, v1);
    memcpy(y, t, nn * sizeof(float));
}

/* named accumulators, not an array: gcc kept an array of them on the stack (a store per FMA) */
#define FMA_ROW(r) if (R > r) { __m256 a = _mm256_broadcast_ss(x + r * ldx + k);          \
        c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0); c##r##1 = _mm256_fmadd_ps(a, b1, c##r##1); }
#define STORE_ROW(r) if (R > r) store_row(y + r * ldy, c##r##0, c##r##1, bias0, bias1, nn);

/* R (<= 6, a constant at every call site) rows of x against one panel: y[r][0..nn) */
static inline __attribute__((always_inline)) void panel_rows(
        const int R, const float *x, int64_t ldx, const float *pp, int64_t K, const float *b, float *y,
        int64_t ldy, int64_t nn, const float *next, int64_t line0, uint64_t inv) {
    const __m256 z = _mm256_setzero_ps();
    __m256 c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z, c40 = z, c41 = z,
           c50 = z, c51 = z;
    for (int64_t k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(pp + k * PANEL), b1 = _mm256_loadu_ps(pp + k * PANEL + 8);
        /* line (line0 + k) / chunks of the next panel; inv = 2^32 / chunks, rounded up */
        _mm_prefetch((const char *)(next + (((uint64_t)(line0 + k) * inv) >> 32) * PANEL), _MM_HINT_T1);
        FMA_ROW(0) FMA_ROW(1) FMA_ROW(2) FMA_ROW(3) FMA_ROW(4) FMA_ROW(5)
    }
    __m256 bias0 = z, bias1 = z;
    if (b) {
        float t[PANEL] = {0};
        memcpy(t, b, nn * sizeof(float));
        bias0 = _mm256_loadu_ps(t);
        bias1 = _mm256_loadu_ps(t + 8);
    }
    STORE_ROW(0) STORE_ROW(1) STORE_ROW(2) STORE_ROW(3) STORE_ROW(4) STORE_ROW(5)
}

#define PANEL_ROWS(R) panel_rows(R, x + m * ldx, ldx, pp, K, bq, y + m * ldy + n0, ldy, nn, pp + K * PANEL, \
                                 m / 6 * K, inv)

/* panel q of W (outputs q·PANEL ..) for all M rows of x */
static inline __attribute__((always_inline)) void panel_all_rows(
        int64_t q, const float *x, int64_t ldx, const float *p, const float *b, float *y, int64_t ldy,
        int64_t M, int64_t N, int64_t K, uint64_t inv) {
    const float *pp = p + q * K * PANEL;
    const int64_t n0 = q * PANEL, nn = N - n0 < PANEL ? N - n0 : PANEL;
    const float *bq = b ? b + n0 : NULL;
    int64_t m = 0;
    for (; m + 6 <= M; m += 6) PANEL_ROWS(6);
    switch (M - m) {
        case 5: PANEL_ROWS(5); break;
        case 4: PANEL_ROWS(4); break;
        case 3: PANEL_ROWS(3); break;
        case 2: PANEL_ROWS(2); break;
        case 1: PANEL_ROWS(1); break;
        default: break;
    }
}

/* A few rows against P consecutive full panels at once (R·P <= 6 accumulator pairs): P streams of the
 * pack read side by side. One core reads ~10 GB/s from one stream and ~18 GB/s from four (a plain
 * AVX2 sum over 1 GiB, 1 thread, Intel Xeon, 2026-12-01), and at 1-3 rows a panel is one stream:
 * the products of a decode step, experts included, read ~10 GB/s from beyond the caches. The next
 * group's panels are prefetched (into L2) alongside. Each output sees the same FMAs in the same
 * order as in panel_rows: bit-identical. */
#define SLOT(s) if (R * P > s) {                                                                  \
        const __m256 a = _mm256_broadcast_ss(x + (s / P) * ldx + k);                               \
        const float *bp = pp + (s % P) * K * PANEL + k * PANEL;                                     \
        d##s##0 = _mm256_fmadd_ps(a, _mm256_loadu_ps(bp), d##s##0);                                \
        d##s##1 = _mm256_fmadd_ps(a, _mm256_loadu_ps(bp + 8), d##s##1); }
#define STORE_SLOT(s) if (R * P > s) {                                                            \
        const float *bs = b ? b + (s % P) * PANEL : NULL;                                           \
        const __m256 b0 = bs ? _mm256_loadu_ps(bs) : z, b1 = bs ? _mm256_loadu_ps(bs + 8) : z;       \
        store_row(y + (s / P) * ldy + (s % P) * PANEL, d##s##0, d##s##1, b0, b1, PANEL); }

static inline __attribute__((always_inline)) void group_rows(
        const int R, const int P, const float *x, int64_t ldx, const float *pp, int64_t K, const float *b,
        float *y, int64_t ldy, const float *next, int64_t next_panels) {
    const __m256 z = _mm256_setzero_ps();
    __m256 d00 = z, d01 = z, d10 = z, d11 = z, d20 = z, d21 = z, d30 = z, d31 = z, d40 = z, d41 = z,
           d50 = z, d51 = z;
    for (int64_t k = 0; k < K; k++) {
        for (int64_t j = 0; j < next_panels; j++) _mm_prefetch((const char *)(next + (j * K + k) * PANEL), _MM_HINT_T1);
        SLOT(0) SLOT(1) SLOT(2) SLOT(3) SLOT(4) SLOT(5)
    }
    STORE_SLOT(0) STORE_SLOT(1) STORE_SLOT(2) STORE_SLOT(3) STORE_SLOT(4) STORE_SLOT(5)
}

/* panels per group for M rows: as many streams as the 12 accumulators allow, 1 past 3 rows */
static inline int64_t group_panels(int64_t M) { return M == 1 ? 4 : M == 2 ? 3 : M == 3 ? 2 : 1; }

/* 4 rows and more on a CPU with AVX-512 (checked at run time; the file is built for AVX2): a zmm holds
 * a whole panel row, so a chunk of up to 12 rows keeps 12 accumulators, one weight load and one
 * broadcast a row per k, half the FMA instructions of the 6x16 ymm block. Each output sees the same
 * FMAs in the same order as in panel_rows: bit-identical (nanoseek_avx512(0) turns it off, for
 * tests). Compute-bound at 16 rows, where the AVX2 block ran tiny's batch-16 products. */
static int use_avx512 = -1;     /* -1: not decided yet */

#define FMA512(r) if (R > r) c##r = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), w, c##r);
#define STORE512(r) if (R > r) _mm512_mask_storeu_ps(y + r * ldy, mask, _mm512_add_ps(c##r, bias));

static inline __attribute__((always_inline, target("avx512f"))) void panel_rows512(
        const int R, const float *x, int64_t ldx, const float *pp, int64_t K, const float *b, float *y,
        int64_t ldy, int64_t nn, const float *next, int64_t line0, uint64_t inv) {
    const __m512 z = _mm512_setzero_ps();
    __m512 c0 = z, c1 = z, c2 = z, c3 = z, c4 = z, c5 = z, c6 = z, c7 = z, c8 = z, c9 = z, c10 = z, c11 = z;
    for (int64_t k = 0; k < K; k++) {
        const __m512 w = _mm512_loadu_ps(pp + k * PANEL);
        _mm_prefetch((const char *)(next + (((uint64_t)(line0 + k) * inv) >> 32) * PANEL), _MM_HINT_T1);
        FMA512(0) FMA512(1) FMA512(2) FMA512(3) FMA512(4) FMA512(5)
        FMA512(6) FMA512(7) FMA512(8) FMA512(9) FMA512(10) FMA512(11)
    }
    const __mmask16 mask = (__mmask16)((1u << nn) - 1);
    const __m512 bias = b ? _mm512_maskz_loadu_ps(mask, b) : z;
    STORE512(0) STORE512(1) STORE512(2) STORE512(3) STORE512(4) STORE512(5)
    STORE512(6) STORE512(7) STORE512(8) STORE512(9) STORE512(10) STORE512(11)
}

#define ROWS512(R) panel_rows512(R, x + m * ldx, ldx, pp, K, bq, y + m * ldy + n0, ldy, nn, pp + K * PANEL, \
                                 m / per * K, inv)

/* the M rows in even chunks of at most 12 (16 rows: 8 + 8, so no chunk waits on the FMA latency) */
static __attribute__((noinline, target("avx512f"))) void panel_all_rows512(
        int64_t q, const float *x, int64_t ldx, const float *p, const float *b, float *y, int64_t ldy,
        int64_t M, int64_t N, int64_t K) {
    const float *pp = p + q * K * PANEL;
    const int64_t n0 = q * PANEL, nn = N - n0 < PANEL ? N - n0 : PANEL;
    const float *bq = b ? b + n0 : NULL;
    const int64_t chunks = (M + 11) / 12, per = (M + chunks - 1) / chunks;
    const uint64_t inv = ((1ull << 32) + chunks - 1) / chunks;
    for (int64_t m = 0; m < M; m += per) {
        switch (M - m < per ? M - m : per) {
            case 12: ROWS512(12); break;
            case 11: ROWS512(11); break;
            case 10: ROWS512(10); break;
            case 9: ROWS512(9); break;
            case 8: ROWS512(8); break;
            case 7: ROWS512(7); break;
            case 6: ROWS512(6); break;
            case 5: ROWS512(5); break;
            case 4: ROWS512(4); break;
            case 3: ROWS512(3); break;
            case 2: ROWS512(2); break;
            default: ROWS512(1); break;
        }
    }
}

/* Whether the AVX-512 block runs (want = 0 turns it off, 1 on where the CPU has AVX-512F). */
int nanoseek_avx512(int want) {
    __builtin_cpu_init();
    use_avx512 = want && __builtin_cpu_supports("avx512f");
    return use_avx512;
}

static inline int avx512_on(void) {
    if (use_avx512 < 0) nanoseek_avx512(1);
    return use_avx512;
}

/* panels q0 .. q1 - 1 of W for all M rows of x: full groups through group_rows, the rest (and every
 * panel past 3 rows) through panel_all_rows */
static inline __attribute__((always_inline)) void panel_range(
        int64_t q0, int64_t q1, const float *x, int64_t ldx, const float *p, const float *b, float *y, int64_t ldy,
        int64_t M, int64_t N, int64_t K, uint64_t inv) {
    const int64_t G = group_panels(M), full = N / PANEL;
    int64_t q = q0;
    for (; G > 1 && q + G <= q1 && q + G <= full; q += G) {
        const float *pp = p + q * K * PANEL, *bq = b ? b + q * PANEL : NULL;
        float *yq = y + q * PANEL;
        const int64_t ahead = (full - q - G) < G ? (full - q - G) : G;     /* the next group's panels */
        switch (M) {
            case 1: group_rows(1, 4, x, ldx, pp, K, bq, yq, ldy, pp + G * K * PANEL, ahead); break;
            case 2: group_rows(2, 3, x, ldx, pp, K, bq, yq, ldy, pp + G * K * PANEL, ahead); break;
            default: group_rows(3, 2, x, ldx, pp, K, bq, yq, ldy, pp + G * K * PANEL, ahead); break;
        }
    }
    if (M >= 4 && avx512_on())
        for (; q < q1; q++) panel_all_rows512(q, x, ldx, p, b, y, ldy, M, N, K);
    for (; q < q1; q++) panel_all_rows(q, x, ldx, p, b, y, ldy, M, N, K, inv);
}

static inline uint64_t inverse_chunks(int64_t M) {       /* 2^32 / (6-row chunks of M), rounded up */
    const int64_t chunks = (M + 5) / 6;
    return ((1ull << 32) + chunks - 1) / chunks;
}

/* x [M, K] (row stride ldx), p from nanoseek_pack16 for W [N, K], b [N] or NULL, y [M, N] (stride ldy);
 * all fp32. Panels are split among `threads` OpenMP threads. */
void nanoseek_gemm_packed(const float *x, int64_t ldx, const float *p, const float *b, float *y, int64_t ldy,
                          int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t panels = (N + PANEL - 1) / PANEL, G = group_panels(M), groups = (panels + G - 1) / G;
    const uint64_t inv = inverse_chunks(M);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < groups; g++)
        panel_range(g * G, (g + 1) * G < panels ? (g + 1) * G : panels, x, ldx, p, b, y, ldy, M, N, K, inv);
}

/* ---------------------------------------------------------------- MoE experts on packed weights
 * y [N, H] = Σ_j wts[n, j] · down_e(silu(gate_e(x_n)) · up_e(x_n)), e = idx[n, j] (SwiGLU experts), with
 * gate/up packed from [E·2I, H] (each expert's gate rows, then its up rows) and down from [E·H, I];
 * 2I and H multiples of PANEL, so each expert owns whole panels. Each expert runs on the rows that
 * chose it (gathered), so its weights are read once and only the chosen pairs' FLOPs are done: at a
 * decode step of 16 tokens, top-2 of 8 experts, a quarter of what every expert on every row costs.
 * Experts are split among threads, each adding into its own copy of y. Returns 0, or -1 when
 * memory runs out or an index is out of range. */
int nanoseek_moe_packed(const float *x, int64_t N, int64_t H, const int64_t *idx, const float *wts, int64_t top,
                        const float *gate_up, const float *down, int64_t E, int64_t I, float *y, int threads) {
    for (int64_t i = 0; i < N * top; i++)
        if (idx[i] < 0 || idx[i] >= E) return -1;
    const int64_t per_thread = N * H + N * 2 * I + N * H + N * H;   /* x rows, gate/up, expert out, own y */
    float *buf = (float *)malloc(sizeof(float) * per_thread * threads + 1);
    int64_t *rows = (int64_t *)malloc(sizeof(int64_t) * N * threads + 1);
    if (!buf || !rows) { free(buf); free(rows); return -1; }
    memset(y, 0, sizeof(float) * N * H);
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num();
        float *xe = buf + t * per_thread, *h = xe + N * H, *out = h + N * 2 * I, *yt = out + N * H;
        int64_t *r = rows + t * N;
        memset(yt, 0, sizeof(float) * N * H);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t e = 0; e < E; e++) {
            int64_t ne = 0;
            for (int64_t n = 0; n < N; n++)
                for (int64_t j = 0; j < top; j++)
                    if (idx[n * top + j] == e) {
                        r[ne] = n;
                        memcpy(xe + ne * H, x + n * H, sizeof(float) * H);
                        ne++;
                        break;
                    }
            if (ne == 0) continue;
            const float *pg = gate_up + e * 2 * I * H, *pd = down + e * H * I;
            uint64_t inv = inverse_chunks(ne);
            panel_range(0, 2 * I / PANEL, xe, H, pg, NULL, h, 2 * I, ne, 2 * I, H, inv);
            /* act = silu(gate) · up · routing weight, in place of gate */
            for (int64_t i = 0; i < ne; i++) {
                float w = 0.f;
                for (int64_t j = 0; j < top; j++)
                    if (idx[r[i] * top + j] == e) w += wts[r[i] * top + j];
                for (int64_t c = 0; c < I; c++) {
                    const float g = h[i * 2 * I + c];
                    h[i * 2 * I + c] = g / (1.f + expf(-g)) * h[i * 2 * I + I + c] * w;
                }
            }
            panel_range(0, H / PANEL, h, 2 * I, pd, NULL, out, H, ne, H, I, inv);
            for (int64_t i = 0; i < ne; i++)
                for (int64_t c = 0; c < H; c++) yt[r[i] * H + c] += out[i * H + c];
        }
        #pragma omp critical
        for (int64_t i = 0; i < N * H; i++) y[i] += yt[i];
    }
    free(buf);
    free(rows);
    return 0;
}

/* ---------------------------------------------------------------- reading speed
 * The sum of x [n] read as `streams` (1..8) equal parts side by side, with AVX2 loads: what one
 * thread can read from memory, for `nanoseek bench engine`'s bandwidth limit. One stream reads
 * ~10 GB/s, four ~18 (Intel Xeon, 2026-12-01: a core keeps more lines in flight over several
 * streams), where torch's x.sum() read ~9.4: a limit measured with it sat below what the decode
 * kernels reach. */
float nanoseek_read(const float *x, int64_t n, int64_t streams) {
    if (streams < 1) streams = 1;
    if (streams > 8) streams = 8;
    const int64_t per = n / streams / 16 * 16;
    __m256 a[8];
    for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < per; i += 16)
        for (int64_t j = 0; j < streams; j++) {
            const float *p = x + j * per + i;
            a[j] = _mm256_add_ps(a[j], _mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)));
        }
    float t[8], s = 0.f;
    for (int j = 1; j < 8; j++) a[0] = _mm256_add_ps(a[0], a[j]);
    _mm256_storeu_ps(t, a[0]);
    for (int j = 0; j < 8; j++) s += t[j];
    for (int64_t i = per * streams; i < n; i++) s += x[i];
    return s;
}
