/* y = x Wᵀ (+ b) for a few rows of x, bf16 weights read once at memory speed (AVX2 + FMA).
 *
 * Built by nanoseek/model/gemv.py (gcc -O3 -mavx2 -mfma -fopenmp, loaded with ctypes into a process
 * that has imported torch, so `omp parallel` runs on torch's own OpenMP runtime and thread count).
 *
 * Why: a decode step of a bf16 model at batch 1 is a chain of matrix-vector products, and its speed
 * limit is reading every weight once. On an AVX2 CPU without native bf16 instructions, torch's bf16
 * F.linear at one row reads at ~55-65 % of what a plain sum over memory reads (issue 13's profile);
 * here a bf16 value becomes an fp32 one by a 16-bit shift, so the loop is loads, shifts and FMAs:
 * 4 weight rows at a time (4 independent accumulators and memory streams), x converted to fp32 once.
 *
 * x [M, K] bf16 (rows contiguous, stride ldx), w [N, K] bf16 (row stride ldw), b [N] bf16 or NULL,
 * y [M, N] bf16 (stride ldy). fp32 accumulation, one rounding to bf16 (nearest even), as F.linear.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* R weight rows (from n) against M x rows; M and R are constants at every call site, so the
 * accumulators stay in registers (M·R + R + 1 <= 16 ymm). While it reads its rows it prefetches the
 * next block's (one cache line per row every 32 values): the hardware prefetcher restarts on every
 * short row, and this took one row of 1536 values from 6.0-6.6 to 7.2 GB/s with 1 thread and from
 * 11.1-11.9 to 13.2-13.4 with 2 (8960 x 1536; 8 rows a block without it: 6.6-6.9 and 12.4-12.6). */
static inline __attribute__((always_inline)) void block(
        int M, int R, const float *xf, int64_t K, const uint16_t *w, int64_t ldw, int64_t n, int64_t N,
        const uint16_t *b, uint16_t *y, int64_t ldy) {
    __m256 acc[MAX_ROWS][4];
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) acc[m][r] = _mm256_setzero_ps();
    const uint16_t *wr = w + n * ldw;
    const int prefetch = n + 2 * R <= N;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[4];
        if (prefetch && (k & 31) == 0)
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(wr + (R + r) * ldw + k), _MM_HINT_T0);
        for (int r = 0; r < R; r++) wv[r] = load8(wr + r * ldw + k);
        for (int m = 0; m < M; m++) {
            __m256 xv = _mm256_loadu_ps(xf + m * K + k);
            for (int r = 0; r < R; r++) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) {
            float s = hsum(acc[m][r]);
            for (int64_t t = k; t < K; t++) s += to_f32(wr[r * ldw + t]) * xf[m * K + t];
            if (b) s += to_f32(b[n + r]);
            y[m * ldy + n + r] = to_bf16(s);
        }
}

#define ROWS_LOOP(M, R)                                                                 \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                   \
    for (int64_t i = 0; i < N / R; i++) block(M, R, xf, K, w, ldw, i * R, N, b, y, ldy);   \
    for (int64_t n = N / R * R; n < N; n++) block(M, 1, xf, K, w, ldw, n, N, b, y, ldy);

/* More than 8 rows (a short prefill): each weight row is read from memory once and used by every
 * chunk of 8 rows of x while it sits in L1. */
static void many_rows(const float *xf, int64_t M, int64_t K, const uint16_t *w, int64_t ldw, int64_t N,
                      const uint16_t *b, uint16_t *y, int64_t ldy, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        int64_t m0 = 0;
        for (; m0 + 8 <= M; m0 += 8) block(8, 1, xf + m0 * K, K, w, ldw, n, N, b, y + m0 * ldy, ldy);
        const float *xr = xf + m0 * K;
        uint16_t *yr = y + m0 * ldy;
        switch (M - m0) {
            case 1: block(1, 1, xr, K, w, ldw, n, N, b, yr, ldy); break;
            case 2: block(2, 1, xr, K, w, ldw, n, N, b, yr, ldy); break;
            case 3: block(3, 1, xr, K, w, ldw, n, N, b, yr, ldy); break;
            case 4: block(4, 1, xr, K, w, ldw, n, N, b, yr, ldy); break;
            case 5: block(5, 1, xr, K, w, ldw, n, N, b, yr, ldy); break;
            case 6: block(6, 1, xr, K, w, ldw, n, N, b, yr, ldy); break;
            case 7: block(7, 1, xr, K, w, ldw, n, N, b, yr, ldy); break;
            default: break;
        }
    }
}

/* `threads`: the caller's torch.get_num_threads() (OpenMP's per-thread setting may differ in the
 * thread that calls). Returns 0, or -1 when M < 1 or memory runs out. */
int nanoseek_gemv_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w, int64_t ldw,
                       const uint16_t *b, uint16_t *y, int64_t ldy, int64_t M, int64_t N, int64_t K,
                       int threads) {
    if (M < 1) return -1;
    float *xf = (float *)malloc(sizeof(float) * M * K);
    if (!xf) return -1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) xf[m * K + k] = to_f32(x[m * ldx + k]);
    switch (M) {
        case 1: { ROWS_LOOP(1, 4) } break;
        case 2: { ROWS_LOOP(2, 4) } break;
        case 3: { ROWS_LOOP(3, 2) } break;
        case 4: { ROWS_LOOP(4, 2) } break;
        case 5: { ROWS_LOOP(5, 1) } break;
        case 6: { ROWS_LOOP(6, 1) } break;
        case 7: { ROWS_LOOP(7, 1) } break;
        case 8: { ROWS_LOOP(8, 1) } break;
        default: many_rows(xf, M, K, w, ldw, N, b, y, ldy, threads); break;
    }
    free(xf);
    return 0;
}
