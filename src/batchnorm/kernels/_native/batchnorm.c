/*
 * Native CPU kernels of the batchnorm package: training forward (statistics,
 * output and the running-statistics update in one call), training backward
 * (both gradient reductions in one pass over x and dy, then dx) and eval.
 *
 * Plain C with no PyTorch headers: batchnorm.native compiles it on first use
 * (a second or so) and calls it through ctypes on the data of contiguous
 * tensors. OpenMP regions run on PyTorch's own OpenMP runtime (the process
 * has already loaded libgomp.so.1 with torch), so torch.set_num_threads
 * governs them and no second thread pool competes with PyTorch's.
 *
 * Numerics, as in batchnorm.kernels: float32, bfloat16 and float16 accumulate
 * in float32 within blocks of at most a few hundred values and in double
 * across blocks; the variance comes from sums shifted by the mean of the first
 * 16 rows (feature-last) or 64 positions (channels-first) of each feature, summed again around the mean found when that shift
 * was more than 4 standard deviations away; y = (x - mean) * (inv_std * weight) + bias.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

#define SHIFT_SAMPLES 64 /* channels-first: leading positions whose mean is the shift */
#define SHIFT_ROWS 16     /* feature-last: leading rows whose mean is the shift */
#define SHIFT_TOLERANCE 16.0
#define NARROW 64  /* feature-last: rows of at most this many features are summed in registers */
#define ROWS 16    /* feature-last, narrow: rows per block */
#define GROUP 8    /* feature-last: rows read side by side */
#define BLOCK 64   /* feature-last: rows summed in the accumulation type before adding into double */
#define CHUNK 1024 /* feature-last: features per pass (their accumulators stay in L1) */
#define LANES 32  /* channels-first: independent partial sums */
#define SPAN 512  /* channels-first: positions summed before adding into double */
#define GRAIN 32768 /* fewer values than this run on one thread (PyTorch's grain size) */

enum { BN_FLOAT32 = 0, BN_FLOAT64 = 1, BN_BFLOAT16 = 2, BN_FLOAT16 = 3 };

static int team_size(int64_t numel) {
#ifdef _OPENMP
    if (numel < GRAIN || omp_in_parallel()) return 1;
    int threads = omp_get_max_threads();
    int64_t most = numel / GRAIN;
    if ((int64_t)threads > most) threads = (int)most;
    return threads < 1 ? 1 : threads;
#else
    (void)numel;
    return 1;
#endif
}

static int thread_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/*
 * Outputs of more than STREAM_BYTES per thread are written with streaming (non-temporal) stores
 * where the CPU has them (x86 AVX, float32): they bypass the cache, which saves reading each output
 * line before it is overwritten (a third of an output pass's traffic) and leaves the cache to the
 * inputs. Smaller outputs are written normally and stay in the cache for the next layer, and so do
 * outputs shared among threads whose caches together hold them. (glibc's memcpy makes the same
 * choice above a threshold of a few MB per thread; the last-level cache size the OS reports inside
 * a virtual machine is often the host's, so the threshold is fixed rather than derived from it.)
 */
#define STREAM_BYTES ((int64_t)4 << 20)

static int stream_output(int64_t bytes) { return bytes > STREAM_BYTES; }

#if defined(__AVX__)
#define HAVE_STREAMING 1
/* Rows [r0, r1) of y = (x - center) * scale + offset (float32), stored with _mm256_stream_ps. */
static void affine_rows_stream(const float *x, float *y, int64_t r0, int64_t r1, int64_t C, int64_t S,
                               const float *center, const float *scale, const float *offset) {
    if (S == 1) {
        for (int64_t m = r0; m < r1; m++) {
            const float *xr = x + m * C;
            float *yr = y + m * C;
            int64_t c = 0;
            for (; c < C && ((uintptr_t)(yr + c) & 31) != 0; c++) yr[c] = (xr[c] - center[c]) * scale[c] + offset[c];
            for (; c + 8 <= C; c += 8) {
                __m256 v = _mm256_sub_ps(_mm256_loadu_ps(xr + c), _mm256_loadu_ps(center + c));
                v = _mm256_add_ps(_mm256_mul_ps(v, _mm256_loadu_ps(scale + c)), _mm256_loadu_ps(offset + c));
                _mm256_stream_ps(yr + c, v);
            }
            for (; c < C; c++) yr[c] = (xr[c] - center[c]) * scale[c] + offset[c];
        }
    } else {
        /* Channels-first: the rows' elements [r0 * S, r1 * S) as one run of aligned 8-float vectors, so every
           streamed line is written whole even when a row (S floats) is not a multiple of a cache line; a
           vector that straddles two rows is formed element by element. */
        int64_t e = r0 * S, end = r1 * S;
        for (; e < end && ((uintptr_t)(y + e) & 31) != 0; e++) {
            int64_t c = (e / S) % C;
            y[e] = (x[e] - center[c]) * scale[c] + offset[c];
        }
        while (e + 8 <= end) {
            int64_t row = e / S, row_end = (row + 1) * S, c = row % C;
            const __m256 vm = _mm256_set1_ps(center[c]), vs = _mm256_set1_ps(scale[c]), vo = _mm256_set1_ps(offset[c]);
            for (; e + 8 <= row_end && e + 8 <= end; e += 8) {
                __m256 v = _mm256_sub_ps(_mm256_loadu_ps(x + e), vm);
                _mm256_stream_ps(y + e, _mm256_add_ps(_mm256_mul_ps(v, vs), vo));
            }
            if (e + 8 <= end && e < row_end) { /* straddles row_end */
                float part[8];
                for (int j = 0; j < 8; j++) {
                    int64_t cj = ((e + j) / S) % C;
                    part[j] = (x[e + j] - center[cj]) * scale[cj] + offset[cj];
                }
                _mm256_stream_ps(y + e, _mm256_loadu_ps(part));
                e += 8;
            }
        }
        for (; e < end; e++) {
            int64_t c = (e / S) % C;
            y[e] = (x[e] - center[c]) * scale[c] + offset[c];
        }
    }
    _mm_sfence();
}

/* Rows [r0, r1) of dx = dy * gain + offset - (x - center) * slope (float32), streamed. */
static void input_grad_rows_stream(const float *dy, const float *x, float *dx, int64_t r0, int64_t r1, int64_t C,
                                   int64_t S, const float *center, const float *gain, const float *offset,
                                   const float *slope) {
    if (S == 1) {
        for (int64_t m = r0; m < r1; m++) {
            const float *xr = x + m * C, *gr = dy + m * C;
            float *dr = dx + m * C;
            int64_t c = 0;
            for (; c < C && ((uintptr_t)(dr + c) & 31) != 0; c++)
                dr[c] = gr[c] * gain[c] + offset[c] - (xr[c] - center[c]) * slope[c];
            for (; c + 8 <= C; c += 8) {
                __m256 g = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(gr + c), _mm256_loadu_ps(gain + c)),
                                         _mm256_loadu_ps(offset + c));
                __m256 u = _mm256_sub_ps(_mm256_loadu_ps(xr + c), _mm256_loadu_ps(center + c));
                _mm256_stream_ps(dr + c, _mm256_sub_ps(g, _mm256_mul_ps(u, _mm256_loadu_ps(slope + c))));
            }
            for (; c < C; c++) dr[c] = gr[c] * gain[c] + offset[c] - (xr[c] - center[c]) * slope[c];
        }
    } else {
        /* Channels-first: one run of aligned vectors over the rows' elements, as in affine_rows_stream. */
        int64_t e = r0 * S, end = r1 * S;
        for (; e < end && ((uintptr_t)(dx + e) & 31) != 0; e++) {
            int64_t c = (e / S) % C;
            dx[e] = dy[e] * gain[c] + offset[c] - (x[e] - center[c]) * slope[c];
        }
        while (e + 8 <= end) {
            int64_t row = e / S, row_end = (row + 1) * S, c = row % C;
            const __m256 vm = _mm256_set1_ps(center[c]), vg = _mm256_set1_ps(gain[c]), vo = _mm256_set1_ps(offset[c]),
                         vs = _mm256_set1_ps(slope[c]);
            for (; e + 8 <= row_end && e + 8 <= end; e += 8) {
                __m256 g = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(dy + e), vg), vo);
                __m256 u = _mm256_sub_ps(_mm256_loadu_ps(x + e), vm);
                _mm256_stream_ps(dx + e, _mm256_sub_ps(g, _mm256_mul_ps(u, vs)));
            }
            if (e + 8 <= end && e < row_end) {
                float part[8];
                for (int j = 0; j < 8; j++) {
                    int64_t cj = ((e + j) / S) % C;
                    part[j] = dy[e + j] * gain[cj] + offset[cj] - (x[e + j] - center[cj]) * slope[cj];
                }
                _mm256_stream_ps(dx + e, _mm256_loadu_ps(part));
                e += 8;
            }
        }
        for (; e < end; e++) {
            int64_t c = (e / S) % C;
            dx[e] = dy[e] * gain[c] + offset[c] - (x[e] - center[c]) * slope[c];
        }
    }
    _mm_sfence();
}
#else
#define HAVE_STREAMING 0
#endif

/* PyTorch's running-statistics blend, (1 - w) * start + w * end (in double): an infinite running
   statistic stays infinite (start + w * (end - start) would turn it into NaN). */
static double lerp(double start, double end, double w) { return (1.0 - w) * start + w * end; }

static inline float bf16_load(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t bf16_store(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return (uint16_t)(f != f ? 0x7fc0u : rounded); /* NaN as PyTorch writes it */
}

#if defined(__AVX2__)
#define HAVE_BF16_AVX2 1
/* 8 bfloat16 -> 8 float. */
static inline __m256 bf16_load8(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* 8 float -> 8 bfloat16, rounded to nearest even, NaN as 0x7fc0: bf16_store on a vector. */
static inline __m128i bf16_pack8(__m256 v) {
    __m256i bits = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}

/* 8 float -> 8 rounded bfloat16 in the low half of each 32-bit lane (NaN as 0x7fc0). */
static inline __m256i bf16_round8(__m256 v) {
    __m256i bits = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
}

/* 16 bfloat16 of one channel-first row run: y = x * scale + shift, where shift = offset - center * scale is
   formed in double per row (PyTorch's form; its float32 rounding is far below bfloat16's). The halves are
   widened with in-lane unpacks, whose order (elements 0-3 and 8-11, then 4-7 and 12-15) packus undoes, so
   no lane-crossing shuffle is needed. */
static inline __m256i bf16_affine16_lanes(const uint16_t *x, __m256 s_lo, __m256 b_lo, __m256 s_hi, __m256 b_hi) {
    __m256i h = _mm256_loadu_si256((const __m256i *)x);
    __m256 lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), h));
    __m256 hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), h));
    return _mm256_packus_epi32(bf16_round8(_mm256_fmadd_ps(lo, s_lo, b_lo)), bf16_round8(_mm256_fmadd_ps(hi, s_hi, b_hi)));
}

static inline __m256i bf16_affine16(const uint16_t *x, __m256 vs, __m256 vb) {
    return bf16_affine16_lanes(x, vs, vb, vs, vb);
}

/* affine_rows for bfloat16 with explicit vectors, 16 elements at a time: the compiler's version of the rounding
   store ran at about half the speed. Channels-first rows are one run of elements [r0 * S, r1 * S) (as in
   affine_rows_stream), so outputs above STREAM_BYTES per thread are written with aligned streaming stores of
   whole cache lines; a vector that straddles two rows is formed element by element. */
static void affine_rows_bf16_avx2(const uint16_t *x, uint16_t *y, int64_t r0, int64_t r1, int64_t C, int64_t S,
                                  const float *center, const float *scale, const float *offset) {
    if (S == 1) {
        /* Dense rows: shift = offset - center * scale per feature, formed once per call. */
        float *shift = (float *)malloc(sizeof(float) * (size_t)C);
        if (shift == NULL) {
            for (int64_t m = r0; m < r1; m++)
                for (int64_t c = 0; c < C; c++)
                    y[m * C + c] = bf16_store((bf16_load(x[m * C + c]) - center[c]) * scale[c] + offset[c]);
            return;
        }
        for (int64_t c = 0; c < C; c++) shift[c] = (float)((double)offset[c] - (double)center[c] * scale[c]);
        for (int64_t m = r0; m < r1; m++) {
            const uint16_t *xr = x + m * C;
            uint16_t *yr = y + m * C;
            int64_t c = 0;
            for (; c + 16 <= C; c += 16) {
                __m256i h = _mm256_loadu_si256((const __m256i *)(xr + c));
                __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16));
                __m256 hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16));
                lo = _mm256_fmadd_ps(lo, _mm256_loadu_ps(scale + c), _mm256_loadu_ps(shift + c));
                hi = _mm256_fmadd_ps(hi, _mm256_loadu_ps(scale + c + 8), _mm256_loadu_ps(shift + c + 8));
                __m256i packed = _mm256_packus_epi32(bf16_round8(lo), bf16_round8(hi));
                _mm256_storeu_si256((__m256i *)(yr + c), _mm256_permute4x64_epi64(packed, 0xd8));
            }
            for (; c + 8 <= C; c += 8) {
                __m256 v = _mm256_fmadd_ps(bf16_load8(xr + c), _mm256_loadu_ps(scale + c), _mm256_loadu_ps(shift + c));
                _mm_storeu_si128((__m128i *)(yr + c), bf16_pack8(v));
            }
            for (; c < C; c++) yr[c] = bf16_store(bf16_load(xr[c]) * scale[c] + shift[c]);
        }
        free(shift);
        return;
    }
    const int stream = stream_output((r1 - r0) * S * (int64_t)sizeof(uint16_t));
    int64_t e = r0 * S, end = r1 * S;
    if (stream)
        for (; e < end && ((uintptr_t)(y + e) & 31) != 0; e++) {
            int64_t c = (e / S) % C;
            y[e] = bf16_store((bf16_load(x[e]) - center[c]) * scale[c] + offset[c]);
        }
    /* Lane positions of the elements in bf16_affine16_lanes's halves. */
    const __m256i index_lo = _mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11);
    const __m256i index_hi = _mm256_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15);
    while (e < end) {
        int64_t row = e / S, row_end = (row + 1) * S, c = row % C;
        const float sc = scale[c];
        const __m256 vs = _mm256_set1_ps(sc), vb = _mm256_set1_ps((float)((double)offset[c] - (double)center[c] * sc));
        if (row_end > end) row_end = end;
        if (stream)
            for (; e + 16 <= row_end; e += 16) _mm256_stream_si256((__m256i *)(y + e), bf16_affine16(x + e, vs, vb));
        else
            for (; e + 16 <= row_end; e += 16) _mm256_storeu_si256((__m256i *)(y + e), bf16_affine16(x + e, vs, vb));
        if (e == row_end) continue;
        if (S >= 16 && e + 16 <= end) { /* straddles row_end: the first k elements are this row's, the rest the next's */
            int64_t next = (c + 1) % C;
            const float sn = scale[next];
            const __m256 ns = _mm256_set1_ps(sn), nb = _mm256_set1_ps((float)((double)offset[next] - (double)center[next] * sn));
            const __m256i k = _mm256_set1_epi32((int)(row_end - e));
            const __m256 in_lo = _mm256_castsi256_ps(_mm256_cmpgt_epi32(k, index_lo));
            const __m256 in_hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(k, index_hi));
            __m256i v = bf16_affine16_lanes(x + e, _mm256_blendv_ps(ns, vs, in_lo), _mm256_blendv_ps(nb, vb, in_lo),
                                            _mm256_blendv_ps(ns, vs, in_hi), _mm256_blendv_ps(nb, vb, in_hi));
            if (stream)
                _mm256_stream_si256((__m256i *)(y + e), v);
            else
                _mm256_storeu_si256((__m256i *)(y + e), v);
            e += 16;
        } else if (e + 16 <= end) { /* rows shorter than a vector: element by element */
            uint16_t part[16];
            for (int j = 0; j < 16; j++) {
                int64_t cj = ((e + j) / S) % C;
                part[j] = bf16_store((bf16_load(x[e + j]) - center[cj]) * scale[cj] + offset[cj]);
            }
            __m256i v = _mm256_loadu_si256((const __m256i *)part);
            if (stream)
                _mm256_stream_si256((__m256i *)(y + e), v);
            else
                _mm256_storeu_si256((__m256i *)(y + e), v);
            e += 16;
        } else {
            for (; e < end; e++) {
                int64_t cj = (e / S) % C;
                y[e] = bf16_store((bf16_load(x[e]) - center[cj]) * scale[cj] + offset[cj]);
            }
        }
    }
    if (stream) _mm_sfence();
}
#else
#define HAVE_BF16_AVX2 0
#endif

#if defined(__AVX2__) && defined(__FMA__)
#define HAVE_FUSED_EVAL_BACKWARD 1
/*
 * The eval backward in one pass with explicit vectors (float32 and bfloat16): for rows [r0, r1), each 8
 * values of dy and x are loaded once, added into the sums s1 += dy, s2 += dy * (x - mean) and turned into
 * dx = dy * gain. Feature-last rows keep per-feature float accumulators (in L1) that are added into double
 * every BLOCK rows; channels-first rows, in runs of SPAN positions, as the sums kernels do.
 */
#define DEFINE_FUSED_EVAL_BACKWARD(NAME, TYPE, LOAD8, STORE8, LOAD1, STORE1)                                       \
    static void NAME(const TYPE *dy, const TYPE *x, TYPE *dx, int64_t r0, int64_t r1, int64_t C, int64_t S,        \
                     const float *mean, const float *gain, double *s1, double *s2) {                                \
        if (S == 1) {                                                                                              \
            float *a1 = (float *)malloc(sizeof(float) * 2 * (size_t)C);                                            \
            if (a1 == NULL) { /* the same sums, one value at a time */                                             \
                for (int64_t m = r0; m < r1; m++)                                                                  \
                    for (int64_t c = 0; c < C; c++) {                                                              \
                        float g = LOAD1(dy[m * C + c]);                                                            \
                        s1[c] += (double)g;                                                                        \
                        s2[c] += (double)(g * (LOAD1(x[m * C + c]) - mean[c]));                                    \
                        dx[m * C + c] = STORE1(g * gain[c]);                                                       \
                    }                                                                                              \
                return;                                                                                            \
            }                                                                                                      \
            float *a2 = a1 + C;                                                                                    \
            for (int64_t rb = r0; rb < r1; rb += BLOCK) {                                                          \
                const int64_t re = rb + BLOCK < r1 ? rb + BLOCK : r1;                                              \
                memset(a1, 0, sizeof(float) * 2 * (size_t)C);                                                      \
                for (int64_t m = rb; m < re; m++) {                                                                \
                    const TYPE *gr = dy + m * C, *xr = x + m * C;                                                  \
                    TYPE *dr = dx + m * C;                                                                         \
                    int64_t c = 0;                                                                                 \
                    for (; c + 8 <= C; c += 8) {                                                                   \
                        __m256 g = LOAD8(gr + c);                                                                  \
                        __m256 u = _mm256_sub_ps(LOAD8(xr + c), _mm256_loadu_ps(mean + c));                        \
                        _mm256_storeu_ps(a1 + c, _mm256_add_ps(_mm256_loadu_ps(a1 + c), g));                       \
                        _mm256_storeu_ps(a2 + c, _mm256_fmadd_ps(g, u, _mm256_loadu_ps(a2 + c)));                  \
                        STORE8(dr + c, _mm256_mul_ps(g, _mm256_loadu_ps(gain + c)));                               \
                    }                                                                                              \
                    for (; c < C; c++) {                                                                           \
                        float g = LOAD1(gr[c]);                                                                    \
                        a1[c] += g;                                                                                \
                        a2[c] = fmaf(g, LOAD1(xr[c]) - mean[c], a2[c]);                                            \
                        dr[c] = STORE1(g * gain[c]);                                                               \
                    }                                                                                              \
                }                                                                                                  \
                for (int64_t c = 0; c < C; c++) {                                                                  \
                    s1[c] += (double)a1[c];                                                                        \
                    s2[c] += (double)a2[c];                                                                        \
                }                                                                                                  \
            }                                                                                                      \
            free(a1);                                                                                              \
            return;                                                                                                \
        }                                                                                                          \
        for (int64_t row = r0; row < r1; row++) {                                                                  \
            const int64_t c = row % C;                                                                             \
            const TYPE *gr = dy + row * S, *xr = x + row * S;                                                      \
            TYPE *dr = dx + row * S;                                                                               \
            const __m256 k = _mm256_set1_ps(mean[c]), gn = _mm256_set1_ps(gain[c]);                                \
            double t1 = 0.0, t2 = 0.0;                                                                             \
            for (int64_t s0 = 0; s0 < S; s0 += SPAN) {                                                             \
                const int64_t n = S - s0 < SPAN ? S - s0 : SPAN;                                                   \
                __m256 v1 = _mm256_setzero_ps(), v2 = _mm256_setzero_ps();                                         \
                __m256 w1 = _mm256_setzero_ps(), w2 = _mm256_setzero_ps();                                         \
                int64_t s = s0;                                                                                    \
                for (; s + 16 <= s0 + n; s += 16) {                                                                \
                    __m256 g = LOAD8(gr + s), h = LOAD8(gr + s + 8);                                               \
                    v1 = _mm256_add_ps(v1, g);                                                                     \
                    w1 = _mm256_add_ps(w1, h);                                                                     \
                    v2 = _mm256_fmadd_ps(g, _mm256_sub_ps(LOAD8(xr + s), k), v2);                                  \
                    w2 = _mm256_fmadd_ps(h, _mm256_sub_ps(LOAD8(xr + s + 8), k), w2);                              \
                    STORE8(dr + s, _mm256_mul_ps(g, gn));                                                          \
                    STORE8(dr + s + 8, _mm256_mul_ps(h, gn));                                                      \
                }                                                                                                  \
                float l1[8], l2[8];                                                                                \
                _mm256_storeu_ps(l1, _mm256_add_ps(v1, w1));                                                       \
                _mm256_storeu_ps(l2, _mm256_add_ps(v2, w2));                                                       \
                for (; s < s0 + n; s++) {                                                                          \
                    float g = LOAD1(gr[s]);                                                                        \
                    l1[0] += g;                                                                                    \
                    l2[0] = fmaf(g, LOAD1(xr[s]) - mean[c], l2[0]);                                                \
                    dr[s] = STORE1(g * gain[c]);                                                                   \
                }                                                                                                  \
                for (int j = 0; j < 8; j++) {                                                                      \
                    t1 += (double)l1[j];                                                                           \
                    t2 += (double)l2[j];                                                                           \
                }                                                                                                  \
            }                                                                                                      \
            s1[c] += t1;                                                                                           \
            s2[c] += t2;                                                                                           \
        }                                                                                                          \
    }

#define F32_LOAD8(p) _mm256_loadu_ps(p)
#define F32_STORE8(p, v) _mm256_storeu_ps((p), (v))
#define F32_ONE(v) (v)
DEFINE_FUSED_EVAL_BACKWARD(fused_eval_backward_f32, float, F32_LOAD8, F32_STORE8, F32_ONE, F32_ONE)
#if HAVE_BF16_AVX2
#define BF16_STORE8(p, v) _mm_storeu_si128((__m128i *)(p), bf16_pack8(v))
DEFINE_FUSED_EVAL_BACKWARD(fused_eval_backward_bf16, uint16_t, bf16_load8, BF16_STORE8, bf16_load, bf16_store)
#endif
#else
#define HAVE_FUSED_EVAL_BACKWARD 0
#endif

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define FN(name) CAT(name, SUFFIX)

#define AFFINE_ROWS FN(affine_rows)
#define FUSES_DX 0 /* 1 where FUSED_EVAL_BACKWARD is defined */
#define T float
#define A float
#define LOAD(v) (v)
#define STORE(v) (v)
#define SUFFIX f32
#if HAVE_STREAMING
#define STREAMING 1
#define STREAM_AFFINE affine_rows_stream
#define STREAM_INPUT_GRAD input_grad_rows_stream
#else
#define STREAMING 0
#define STREAM_AFFINE FN(affine_rows)
#define STREAM_INPUT_GRAD FN(input_grad_rows)
#endif
#if HAVE_FUSED_EVAL_BACKWARD
#define FUSED_EVAL_BACKWARD fused_eval_backward_f32
#undef FUSES_DX
#define FUSES_DX 1
#endif
#include "typed.h"
#undef FUSED_EVAL_BACKWARD
#undef FUSES_DX
#define FUSES_DX 0
#undef STREAMING
#undef STREAM_AFFINE
#undef STREAM_INPUT_GRAD
#define STREAMING 0
#define STREAM_AFFINE FN(affine_rows)
#define STREAM_INPUT_GRAD FN(input_grad_rows)
#undef T
#undef A
#undef LOAD
#undef STORE
#undef SUFFIX

#define T double
#define A double
#define LOAD(v) (v)
#define STORE(v) (v)
#define SUFFIX f64
#include "typed.h"
#undef T
#undef A
#undef LOAD
#undef STORE
#undef SUFFIX

#define T uint16_t
#define A float
#define LOAD(v) bf16_load(v)
#define STORE(v) bf16_store(v)
#define SUFFIX bf16
#if HAVE_BF16_AVX2
#undef AFFINE_ROWS
#define AFFINE_ROWS affine_rows_bf16_avx2
#endif
#if HAVE_FUSED_EVAL_BACKWARD && HAVE_BF16_AVX2
#define FUSED_EVAL_BACKWARD fused_eval_backward_bf16
#undef FUSES_DX
#define FUSES_DX 1
#endif
#include "typed.h"
#undef FUSED_EVAL_BACKWARD
#undef FUSES_DX
#define FUSES_DX 0
#undef AFFINE_ROWS
#define AFFINE_ROWS FN(affine_rows)
#undef T
#undef A
#undef LOAD
#undef STORE
#undef SUFFIX

#ifdef __FLT16_MAX__
#define HAVE_FLOAT16 1
#define T _Float16
#define A float
#define LOAD(v) ((float)(v))
#define STORE(v) ((_Float16)(v))
#define SUFFIX f16
#include "typed.h"
#undef T
#undef A
#undef LOAD
#undef STORE
#undef SUFFIX
#else
#define HAVE_FLOAT16 0
#endif

/* An entry point's body: the kernel `name` of the dtype's instance (name_f32, ...), -1 for a dtype this build
   has no kernels for. */
#if HAVE_FLOAT16
#define FLOAT16_CASE(name, ...)                                                                                    \
    case BN_FLOAT16:                                                                                               \
        return name##_f16(__VA_ARGS__);
#else
#define FLOAT16_CASE(name, ...)
#endif
#define DISPATCH(name, ...)                                                                                        \
    switch (dtype) {                                                                                               \
    case BN_FLOAT32:                                                                                               \
        return name##_f32(__VA_ARGS__);                                                                            \
    case BN_FLOAT64:                                                                                               \
        return name##_f64(__VA_ARGS__);                                                                            \
    case BN_BFLOAT16:                                                                                              \
        return name##_bf16(__VA_ARGS__);                                                                           \
        FLOAT16_CASE(name, __VA_ARGS__)                                                                            \
    default:                                                                                                       \
        return -1;                                                                                                 \
    }

/* Version of this interface; batchnorm.native refuses a library reporting another. */
int bn_version(void) { return 1; }

/* Whether this build has kernels for the dtype code. */
int bn_supports(int dtype) {
    return dtype == BN_FLOAT32 || dtype == BN_FLOAT64 || dtype == BN_BFLOAT16 || (dtype == BN_FLOAT16 && HAVE_FLOAT16);
}

/* Threads a region over numel values would use now. */
int bn_team_size(int64_t numel) { return team_size(numel); }

/*
 * Training forward on a contiguous (B, C, S) tensor x. Writes y (unless NULL),
 * and mean_out, invstd_out, var_out (biased) where not NULL. When every mean
 * and variance is finite and running_mean/running_var are given, blends the
 * batch mean and unbiased variance into them with weight momentum (momentum < 0:
 * 1 / (*counter + 1)) and increments *counter (unless NULL).
 * Per-feature pointers are of the accumulation type (float; double for float64 x).
 * Returns 0, 1 for a batch with a non-finite statistic (nothing blended or
 * counted), -1 for an unsupported dtype, -2 when memory ran out.
 */
int bn_forward(int dtype, const void *x, void *y, int64_t B, int64_t C, int64_t S, const void *weight,
               const void *bias, void *mean_out, void *invstd_out, void *var_out, void *running_mean,
               void *running_var, double momentum, int64_t *counter, double eps) {
    DISPATCH(forward, x, y, B, C, S, weight, bias, mean_out, invstd_out, var_out, running_mean, running_var, momentum,
             counter, eps);
}

/*
 * Training backward: grad_weight = sum(dy * x_hat), grad_bias = sum(dy) and,
 * unless dx is NULL, dx = gain * (dy - mean(dy) - x_hat * mean(dy * x_hat)),
 * gain = invstd * weight. One pass over x and dy for both sums, one for dx.
 */
int bn_backward(int dtype, const void *dy, const void *x, void *dx, int64_t B, int64_t C, int64_t S,
                const void *mean, const void *invstd, const void *weight, void *grad_weight, void *grad_bias) {
    DISPATCH(backward, dy, x, dx, B, C, S, mean, invstd, weight, grad_weight, grad_bias);
}

/* Eval: y = (x - running_mean) * (weight / sqrt(running_var + eps)) + bias. */
int bn_inference(int dtype, const void *x, void *y, int64_t B, int64_t C, int64_t S, const void *running_mean,
                 const void *running_var, const void *weight, const void *bias, double eps) {
    DISPATCH(inference, x, y, B, C, S, running_mean, running_var, weight, bias, eps);
}

/* The normalize primitive on a contiguous (B, C, S) x: y = (x - mean) * (invstd * weight) + bias. */
int bn_normalize(int dtype, const void *x, void *y, int64_t B, int64_t C, int64_t S, const void *mean,
                 const void *invstd, const void *weight, const void *bias) {
    DISPATCH(normalize, x, y, B, C, S, mean, invstd, weight, bias);
}

/* The grad_input primitive: dx from dy, x, the statistics and the two gradient sums over `count` values. */
int bn_grad_input(int dtype, const void *dy, const void *x, void *dx, int64_t B, int64_t C, int64_t S,
                  const void *mean, const void *invstd, const void *weight, const void *sum_dy,
                  const void *sum_dy_xhat, double count) {
    DISPATCH(grad_input_sums, dy, x, dx, B, C, S, mean, invstd, weight, sum_dy, sum_dy_xhat, count);
}

/* Eval backward: grad_weight = sum(dy * x_hat), grad_bias = sum(dy) (when both are not NULL) and
   dx = dy * invstd * weight (when dx is not NULL), x_hat = (x - mean) * invstd; one pass over dy and x where the
   type has the fused loop (float32, bfloat16 on AVX2), else the sums pass, then the dx pass. */
int bn_eval_backward(int dtype, const void *dy, const void *x, void *dx, int64_t B, int64_t C, int64_t S,
                     const void *mean, const void *invstd, const void *weight, void *grad_weight, void *grad_bias) {
    DISPATCH(eval_backward, dy, x, dx, B, C, S, mean, invstd, weight, grad_weight, grad_bias);
}
