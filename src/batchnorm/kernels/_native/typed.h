/*
 * Batch-norm kernels for one element type. batchnorm.c includes this file
 * once per type, with these macros defined:
 *
 *   T          the element type in memory (float, double, uint16_t for bfloat16, _Float16)
 *   A          the accumulation type (float, or double for double)
 *   LOAD(v)    T -> A
 *   STORE(v)   A -> T, rounded to nearest even
 *   FN(name)   name##_<type>
 *   AFFINE_ROWS  the function writing rows of y = (x - center) * scale + offset: FN(affine_rows), or a
 *              hand-vectorized one (bfloat16 on AVX2)
 *   FUSED_EVAL_BACKWARD  (optional) the eval backward's rows with both sums and dx in one loop of explicit
 *              vectors (float32 and bfloat16 on AVX2); FUSES_DX is 1 where it is defined, else 0
 *   STREAMING, STREAM_AFFINE, STREAM_INPUT_GRAD
 *              1 and the float32 streaming-store versions of affine_rows and input_grad_rows,
 *              or 0 and the plain ones (for the other types)
 *
 * Every tensor is a contiguous (B, C, S) view: C features, B blocks before the
 * feature axis and S positions after it. S == 1 is the feature-last layout (an
 * (M, C) matrix: dense, channels-last, sequences), S > 1 channels-first.
 * Per-feature vectors (shift, mean, scales) are A arrays of C values.
 */

/* Shift of the one-pass sums: the mean of each feature's first SHIFT_ROWS rows (feature-last) or first
   SHIFT_SAMPLES positions (channels-first). */
static void FN(shift)(const T *x, int64_t B, int64_t C, int64_t S, double *k) {
    if (S == 1) {
        int64_t n = B < SHIFT_ROWS ? B : SHIFT_ROWS;
        for (int64_t c = 0; c < C; c++) k[c] = 0.0;
        for (int64_t m = 0; m < n; m++) {
            const T *row = x + m * C;
            for (int64_t c = 0; c < C; c++) k[c] += (double)LOAD(row[c]);
        }
        for (int64_t c = 0; c < C; c++) k[c] /= (double)n;
    } else {
        int64_t n = S < SHIFT_SAMPLES ? S : SHIFT_SAMPLES;
        for (int64_t c = 0; c < C; c++) {
            const T *row = x + c * S;
            double acc = 0.0;
            for (int64_t s = 0; s < n; s++) acc += (double)LOAD(row[s]);
            k[c] = acc / (double)n;
        }
    }
}

/*
 * Feature-last sums for narrow rows (C <= NARROW): NARROW features of ROWS rows at a time in
 * registers; rows are then read in order, and the next block is prefetched while one is summed.
 */
static void FN(sums_rows_narrow)(const T *x, const T *dy, int64_t r0, int64_t r1, int64_t C, const A *k,
                                 double *s1, double *s2) {
    const int64_t line = 64 / (int64_t)sizeof(T);
    A kc[NARROW];
    for (int64_t j = 0; j < NARROW; j++) kc[j] = j < C ? k[j] : (A)0;
    for (int64_t rb = r0; rb < r1; rb += ROWS) {
        int64_t re = rb + ROWS < r1 ? rb + ROWS : r1;
        int64_t pe = re + ROWS < r1 ? re + ROWS : r1;
        for (int64_t p = re * C; p < pe * C; p += line) {
            __builtin_prefetch(x + p, 0, 0);
            if (dy != NULL) __builtin_prefetch(dy + p, 0, 0);
        }
        A a1[NARROW], a2[NARROW];
        for (int j = 0; j < NARROW; j++) {
            a1[j] = 0;
            a2[j] = 0;
        }
        if (C == NARROW) {
            if (dy == NULL) {
                for (int64_t m = rb; m < re; m++) {
                    const T *xr = x + m * NARROW;
                    for (int j = 0; j < NARROW; j++) {
                        A u = LOAD(xr[j]) - kc[j];
                        a1[j] += u;
                        a2[j] += u * u;
                    }
                }
            } else {
                for (int64_t m = rb; m < re; m++) {
                    const T *xr = x + m * NARROW, *gr = dy + m * NARROW;
                    for (int j = 0; j < NARROW; j++) {
                        A g = LOAD(gr[j]);
                        a1[j] += g;
                        a2[j] += g * (LOAD(xr[j]) - kc[j]);
                    }
                }
            }
        } else {
            for (int64_t m = rb; m < re; m++) {
                const T *xr = x + m * C;
                if (dy == NULL) {
                    for (int64_t j = 0; j < C; j++) {
                        A u = LOAD(xr[j]) - kc[j];
                        a1[j] += u;
                        a2[j] += u * u;
                    }
                } else {
                    const T *gr = dy + m * C;
                    for (int64_t j = 0; j < C; j++) {
                        A g = LOAD(gr[j]);
                        a1[j] += g;
                        a2[j] += g * (LOAD(xr[j]) - kc[j]);
                    }
                }
            }
        }
        for (int64_t j = 0; j < C; j++) {
            s1[j] += (double)a1[j];
            s2[j] += (double)a2[j];
        }
    }
}

/*
 * Feature-last pair of sums over rows [r0, r1), added into s1 and s2 (C doubles each):
 *   dy == NULL:  s1 += sum(x - k),  s2 += sum((x - k)^2)
 *   otherwise:   s1 += sum(dy),     s2 += sum(dy * (x - k))
 * GROUP rows are read side by side (GROUP sequential streams) and their terms added together
 * before touching the per-feature accumulators, which stay in L1 (CHUNK features at a time); the
 * accumulators, in A, are added into double every BLOCK rows.
 */
static void FN(sums_rows)(const T *x, const T *dy, int64_t r0, int64_t r1, int64_t C, const A *k, double *s1,
                          double *s2) {
    A a1[CHUNK], a2[CHUNK];
    for (int64_t c0 = 0; c0 < C; c0 += CHUNK) {
        const int64_t n = C - c0 < CHUNK ? C - c0 : CHUNK;
        const A *kc = k + c0;
        for (int64_t rb = r0; rb < r1; rb += BLOCK) {
            const int64_t re = rb + BLOCK < r1 ? rb + BLOCK : r1;
            for (int64_t j = 0; j < n; j++) {
                a1[j] = 0;
                a2[j] = 0;
            }
            int64_t m = rb;
            for (; m + GROUP <= re; m += GROUP) {
                const T *x0 = x + m * C + c0;
                if (dy == NULL) {
                    for (int64_t j = 0; j < n; j++) {
                        A t1 = 0, t2 = 0;
                        for (int r = 0; r < GROUP; r++) {
                            A u = LOAD(x0[r * C + j]) - kc[j];
                            t1 += u;
                            t2 += u * u;
                        }
                        a1[j] += t1;
                        a2[j] += t2;
                    }
                } else {
                    const T *g0 = dy + m * C + c0;
                    for (int64_t j = 0; j < n; j++) {
                        A t1 = 0, t2 = 0;
                        for (int r = 0; r < GROUP; r++) {
                            A g = LOAD(g0[r * C + j]);
                            t1 += g;
                            t2 += g * (LOAD(x0[r * C + j]) - kc[j]);
                        }
                        a1[j] += t1;
                        a2[j] += t2;
                    }
                }
            }
            for (; m < re; m++) {
                const T *xr = x + m * C + c0;
                if (dy == NULL) {
                    for (int64_t j = 0; j < n; j++) {
                        A u = LOAD(xr[j]) - kc[j];
                        a1[j] += u;
                        a2[j] += u * u;
                    }
                } else {
                    const T *gr = dy + m * C + c0;
                    for (int64_t j = 0; j < n; j++) {
                        A g = LOAD(gr[j]);
                        a1[j] += g;
                        a2[j] += g * (LOAD(xr[j]) - kc[j]);
                    }
                }
            }
            for (int64_t j = 0; j < n; j++) {
                s1[c0 + j] += (double)a1[j];
                s2[c0 + j] += (double)a2[j];
            }
        }
    }
}

/* Channels-first pair of sums (same two modes) over one row of S positions, in double. */
static void FN(sums_row)(const T *xr, const T *gr, int64_t S, A kc, double *t1, double *t2) {
    double r1 = 0.0, r2 = 0.0;
    /* A row of up to 2 * SPAN values is one span: its partial sums are reduced once, not twice. */
    const int64_t span = S <= 2 * SPAN ? S : SPAN;
    for (int64_t s0 = 0; s0 < S; s0 += span) {
        int64_t n = S - s0 < span ? S - s0 : span;
        A v1[LANES], v2[LANES];
        for (int j = 0; j < LANES; j++) {
            v1[j] = 0;
            v2[j] = 0;
        }
        int64_t s = 0;
        if (gr == NULL) {
            for (; s + LANES <= n; s += LANES) {
                for (int j = 0; j < LANES; j++) {
                    A u = LOAD(xr[s0 + s + j]) - kc;
                    v1[j] += u;
                    v2[j] += u * u;
                }
            }
            for (; s < n; s++) {
                A u = LOAD(xr[s0 + s]) - kc;
                v1[0] += u;
                v2[0] += u * u;
            }
        } else {
            for (; s + LANES <= n; s += LANES) {
                for (int j = 0; j < LANES; j++) {
                    A g = LOAD(gr[s0 + s + j]);
                    v1[j] += g;
                    v2[j] += g * (LOAD(xr[s0 + s + j]) - kc);
                }
            }
            for (; s < n; s++) {
                A g = LOAD(gr[s0 + s]);
                v1[0] += g;
                v2[0] += g * (LOAD(xr[s0 + s]) - kc);
            }
        }
        /* The partial sums folded to 8 lanes with vector adds, then into double: a short row's reduction
           no longer costs as much as the row itself. */
        for (int b = 8; b < LANES; b += 8) {
            for (int j = 0; j < 8; j++) {
                v1[j] += v1[b + j];
                v2[j] += v2[b + j];
            }
        }
        for (int j = 0; j < 8; j++) {
            r1 += (double)v1[j];
            r2 += (double)v2[j];
        }
    }
    *t1 = r1;
    *t2 = r2;
}

/* Channels-first sums over rows [r0, r1) of the (B * C, S) matrix, in memory order, added into s1, s2. */
static void FN(sums_rows_cf)(const T *x, const T *dy, int64_t r0, int64_t r1, int64_t C, int64_t S, const A *k,
                             double *s1, double *s2) {
    for (int64_t row = r0; row < r1; row++) {
        int64_t c = row % C;
        double t1, t2;
        FN(sums_row)(x + row * S, dy == NULL ? NULL : dy + row * S, S, k[c], &t1, &t2);
        s1[c] += t1;
        s2[c] += t2;
    }
}

/* Both sums over rows [r0, r1), added into s1 and s2, by the variant for the layout. With dx (only where
   FUSED_EVAL_BACKWARD exists; the caller checks FUSES_DX), also dx = dy * gain in the same loop. */
static void FN(sums_range)(const T *x, const T *dy, T *dx, const A *gain, int64_t r0, int64_t r1, int64_t C,
                           int64_t S, const A *k, double *s1, double *s2) {
#ifdef FUSED_EVAL_BACKWARD
    if (dx != NULL) {
        FUSED_EVAL_BACKWARD(dy, x, dx, r0, r1, C, S, k, gain, s1, s2);
        return;
    }
#else
    (void)dx;
    (void)gain;
#endif
    if (S == 1 && C <= NARROW)
        FN(sums_rows_narrow)(x, dy, r0, r1, C, k, s1, s2);
    else if (S == 1)
        FN(sums_rows)(x, dy, r0, r1, C, k, s1, s2);
    else
        FN(sums_rows_cf)(x, dy, r0, r1, C, S, k, s1, s2);
}

/* Both sums for every feature, in double, with the threads of the (shared) OpenMP runtime. Memory is
   read in order, split in contiguous ranges of rows, one per thread, each with its own partial sums.
   dx and gain: NULL, or (with FUSES_DX) dx = dy * gain written in the same pass. */
static int FN(sums)(const T *x, const T *dy, T *dx, const A *gain, int64_t B, int64_t C, int64_t S, const A *k,
                    double *s1, double *s2) {
    int threads = team_size(B * C * S);
    int64_t rows = S == 1 ? B : B * C;
    for (int64_t c = 0; c < C; c++) s1[c] = s2[c] = 0.0;
    if (threads == 1) {
        FN(sums_range)(x, dy, dx, gain, 0, rows, C, S, k, s1, s2);
        return 0;
    }
    double *part = (double *)calloc((size_t)threads * 2 * (size_t)C, sizeof(double));
    if (part == NULL) return -2;
#pragma omp parallel num_threads(threads)
    {
        int t = thread_index();
        int64_t r0 = rows * t / threads, r1 = rows * (t + 1) / threads;
        double *p1 = part + (size_t)t * 2 * C, *p2 = p1 + C;
        FN(sums_range)(x, dy, dx, gain, r0, r1, C, S, k, p1, p2);
    }
    for (int t = 0; t < threads; t++) {
        const double *p1 = part + (size_t)t * 2 * C, *p2 = p1 + C;
        for (int64_t c = 0; c < C; c++) {
            s1[c] += p1[c];
            s2[c] += p2[c];
        }
    }
    free(part);
    return 0;
}

/* y = (x - center) * scale + offset for rows [r0, r1) of the (B * C, S) or (B, C) matrix. */
static void FN(affine_rows)(const T *x, T *y, int64_t r0, int64_t r1, int64_t C, int64_t S, const A *center,
                            const A *scale, const A *offset) {
    if (S == 1) {
        for (int64_t m = r0; m < r1; m++) {
            const T *xr = x + m * C;
            T *yr = y + m * C;
            for (int64_t c = 0; c < C; c++) yr[c] = STORE((LOAD(xr[c]) - center[c]) * scale[c] + offset[c]);
        }
    } else {
        for (int64_t row = r0; row < r1; row++) {
            int64_t c = row % C;
            const A mc = center[c], sc = scale[c], oc = offset[c];
            const T *xr = x + row * S;
            T *yr = y + row * S;
            for (int64_t s = 0; s < S; s++) yr[s] = STORE((LOAD(xr[s]) - mc) * sc + oc);
        }
    }
}

static void FN(affine)(const T *x, T *y, int64_t B, int64_t C, int64_t S, const A *center, const A *scale,
                       const A *offset) {
    int threads = team_size(B * C * S);
    int64_t rows = S == 1 ? B : B * C;
    int stream = STREAMING && stream_output(B * C * S * (int64_t)sizeof(T) / threads);
    if (threads == 1) {
        if (stream)
            STREAM_AFFINE(x, y, 0, rows, C, S, center, scale, offset);
        else
            AFFINE_ROWS(x, y, 0, rows, C, S, center, scale, offset);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        int t = thread_index();
        int64_t r0 = rows * t / threads, r1 = rows * (t + 1) / threads;
        if (stream)
            STREAM_AFFINE(x, y, r0, r1, C, S, center, scale, offset);
        else
            AFFINE_ROWS(x, y, r0, r1, C, S, center, scale, offset);
    }
}

/* dx = dy * gain + offset - (x - center) * slope for rows [r0, r1). */
static void FN(input_grad_rows)(const T *dy, const T *x, T *dx, int64_t r0, int64_t r1, int64_t C, int64_t S,
                                const A *center, const A *gain, const A *offset, const A *slope) {
    if (S == 1) {
        for (int64_t m = r0; m < r1; m++) {
            const T *xr = x + m * C, *gr = dy + m * C;
            T *dr = dx + m * C;
            for (int64_t c = 0; c < C; c++)
                dr[c] = STORE(LOAD(gr[c]) * gain[c] + offset[c] - (LOAD(xr[c]) - center[c]) * slope[c]);
        }
    } else {
        for (int64_t row = r0; row < r1; row++) {
            int64_t c = row % C;
            const A mc = center[c], gc = gain[c], oc = offset[c], sc = slope[c];
            const T *xr = x + row * S, *gr = dy + row * S;
            T *dr = dx + row * S;
            for (int64_t s = 0; s < S; s++) dr[s] = STORE(LOAD(gr[s]) * gc + oc - (LOAD(xr[s]) - mc) * sc);
        }
    }
}

static void FN(input_grad)(const T *dy, const T *x, T *dx, int64_t B, int64_t C, int64_t S, const A *center,
                           const A *gain, const A *offset, const A *slope) {
    int threads = team_size(B * C * S);
    int64_t rows = S == 1 ? B : B * C;
    int stream = STREAMING && stream_output(B * C * S * (int64_t)sizeof(T) / threads);
    if (threads == 1) {
        if (stream)
            STREAM_INPUT_GRAD(dy, x, dx, 0, rows, C, S, center, gain, offset, slope);
        else
            FN(input_grad_rows)(dy, x, dx, 0, rows, C, S, center, gain, offset, slope);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        int t = thread_index();
        int64_t r0 = rows * t / threads, r1 = rows * (t + 1) / threads;
        if (stream)
            STREAM_INPUT_GRAD(dy, x, dx, r0, r1, C, S, center, gain, offset, slope);
        else
            FN(input_grad_rows)(dy, x, dx, r0, r1, C, S, center, gain, offset, slope);
    }
}

static int FN(forward)(const T *x, T *y, int64_t B, int64_t C, int64_t S, const A *weight, const A *bias, A *mean_out,
                       A *invstd_out, A *var_out, A *running_mean, A *running_var, double momentum, int64_t *counter,
                       double eps) {
    const double count = (double)B * (double)S;
    double *work = (double *)malloc(sizeof(double) * 5 * (size_t)C);
    A *acc = (A *)malloc(sizeof(A) * 3 * (size_t)C);
    if (work == NULL || acc == NULL) {
        free(work);
        free(acc);
        return -2;
    }
    double *k = work, *s1 = work + C, *s2 = work + 2 * C, *mean = work + 3 * C, *var = work + 4 * C;
    A *center = acc, *scale = acc + C, *offset = acc + 2 * C;
    FN(shift)(x, B, C, S, k);
    int status = 0;
    for (int round = 0; round < 2; round++) {
        for (int64_t c = 0; c < C; c++) center[c] = (A)k[c];
        status = FN(sums)(x, NULL, NULL, NULL, B, C, S, center, s1, s2);
        if (status != 0) break;
        int far = 0;
        for (int64_t c = 0; c < C; c++) {
            double off = s1[c] / count;
            double v = s2[c] / count - off * off;
            v = v < 0.0 ? 0.0 : v;
            mean[c] = (double)center[c] + off;
            var[c] = v;
            if (off * off > SHIFT_TOLERANCE * v) far = 1;
        }
        if (!far) break;
        for (int64_t c = 0; c < C; c++) k[c] = mean[c];
    }
    if (status == 0) {
        int finite = 1;
        for (int64_t c = 0; c < C; c++) {
            double inv = 1.0 / sqrt(var[c] + eps);
            if (!isfinite(mean[c]) || !isfinite(var[c])) finite = 0;
            center[c] = (A)mean[c];
            scale[c] = (A)(weight == NULL ? inv : inv * (double)weight[c]);
            offset[c] = bias == NULL ? (A)0 : bias[c];
            if (mean_out != NULL) mean_out[c] = (A)mean[c];
            if (invstd_out != NULL) invstd_out[c] = (A)inv;
            if (var_out != NULL) var_out[c] = (A)var[c];
        }
        if (y != NULL) FN(affine)(x, y, B, C, S, center, scale, offset);
        if (!finite) {
            status = 1;
        } else if (running_mean != NULL) {
            double w = momentum;
            if (w < 0.0) w = 1.0 / (double)(*counter + 1); /* cumulative average */
            double unbias = count / (count - 1.0);
            for (int64_t c = 0; c < C; c++) {
                running_mean[c] = (A)lerp(running_mean[c], mean[c], w);
                running_var[c] = (A)lerp(running_var[c], var[c] * unbias, w);
            }
            if (counter != NULL) *counter += 1;
        }
    }
    free(work);
    free(acc);
    return status;
}

static int FN(backward)(const T *dy, const T *x, T *dx, int64_t B, int64_t C, int64_t S, const A *mean,
                        const A *invstd, const A *weight, A *grad_weight, A *grad_bias) {
    const double count = (double)B * (double)S;
    double *work = (double *)malloc(sizeof(double) * 2 * (size_t)C);
    A *acc = (A *)malloc(sizeof(A) * 3 * (size_t)C);
    if (work == NULL || acc == NULL) {
        free(work);
        free(acc);
        return -2;
    }
    double *s1 = work, *s2 = work + C;
    int status = FN(sums)(x, dy, NULL, NULL, B, C, S, mean, s1, s2);
    if (status == 0) {
        A *gain = acc, *offset = acc + C, *slope = acc + 2 * C;
        for (int64_t c = 0; c < C; c++) {
            double inv = (double)invstd[c];
            double g = weight == NULL ? inv : inv * (double)weight[c];
            grad_weight[c] = (A)(s2[c] * inv);
            grad_bias[c] = (A)s1[c];
            gain[c] = (A)g;
            offset[c] = (A)(-g * s1[c] / count);
            slope[c] = (A)(g * inv * inv * s2[c] / count);
        }
        if (dx != NULL) FN(input_grad)(dy, x, dx, B, C, S, mean, gain, offset, slope);
    }
    free(work);
    free(acc);
    return status;
}

static int FN(inference)(const T *x, T *y, int64_t B, int64_t C, int64_t S, const A *running_mean,
                         const A *running_var, const A *weight, const A *bias, double eps) {
    A *acc = (A *)malloc(sizeof(A) * 2 * (size_t)C);
    if (acc == NULL) return -2;
    A *scale = acc, *offset = acc + C;
    for (int64_t c = 0; c < C; c++) {
        double inv = 1.0 / sqrt((double)running_var[c] + eps);
        scale[c] = (A)(weight == NULL ? inv : inv * (double)weight[c]);
        offset[c] = bias == NULL ? (A)0 : bias[c];
    }
    FN(affine)(x, y, B, C, S, running_mean, scale, offset);
    free(acc);
    return 0;
}

/* The normalize primitive: y = (x - mean) * (invstd * weight) + bias; a NULL mean is zero. */
static int FN(normalize)(const T *x, T *y, int64_t B, int64_t C, int64_t S, const A *mean, const A *invstd,
                         const A *weight, const A *bias) {
    A *acc = (A *)malloc(sizeof(A) * 3 * (size_t)C);
    if (acc == NULL) return -2;
    A *scale = acc, *offset = acc + C, *center = acc + 2 * C;
    for (int64_t c = 0; c < C; c++) {
        scale[c] = (A)(weight == NULL ? (double)invstd[c] : (double)invstd[c] * (double)weight[c]);
        offset[c] = bias == NULL ? (A)0 : bias[c];
        center[c] = mean == NULL ? (A)0 : mean[c];
    }
    FN(affine)(x, y, B, C, S, center, scale, offset);
    free(acc);
    return 0;
}

/* The grad_input primitive: dx = gain * (dy - sum_dy / count - x_hat * sum_dy_xhat / count), gain = invstd * weight,
   as dx = dy * gain + offset - (x - mean) * slope with per-feature offset and slope formed in double. */
static int FN(grad_input_sums)(const T *dy, const T *x, T *dx, int64_t B, int64_t C, int64_t S, const A *mean,
                               const A *invstd, const A *weight, const A *sum_dy, const A *sum_dy_xhat, double count) {
    A *acc = (A *)malloc(sizeof(A) * 3 * (size_t)C);
    if (acc == NULL) return -2;
    A *gain = acc, *offset = acc + C, *slope = acc + 2 * C;
    for (int64_t c = 0; c < C; c++) {
        double inv = (double)invstd[c];
        double g = weight == NULL ? inv : inv * (double)weight[c];
        gain[c] = (A)g;
        offset[c] = (A)(-g * (double)sum_dy[c] / count);
        slope[c] = (A)(g * inv * ((double)sum_dy_xhat[c] / count));
    }
    FN(input_grad)(dy, x, dx, B, C, S, mean, gain, offset, slope);
    free(acc);
    return 0;
}

/* Eval backward (the map y = (x - mean) * invstd * weight + bias with constant mean and invstd):
   grad_weight = sum(dy * (x - mean)) * invstd and grad_bias = sum(dy) (both, or neither when NULL), and
   dx = dy * (invstd * weight) unless dx is NULL. Both at once: one pass over dy and x where the type has the
   fused loop (FUSES_DX), else the sums pass and then the dx pass. */
static int FN(eval_backward)(const T *dy, const T *x, T *dx, int64_t B, int64_t C, int64_t S, const A *mean,
                             const A *invstd, const A *weight, A *grad_weight, A *grad_bias) {
    const int sums = grad_weight != NULL && grad_bias != NULL;
    A *acc = (A *)malloc(sizeof(A) * 2 * (size_t)C);
    double *work = (double *)malloc(sizeof(double) * 2 * (size_t)C);
    if (acc == NULL || work == NULL) {
        free(acc);
        free(work);
        return -2;
    }
    A *gain = acc, *zero = acc + C;
    double *s1 = work, *s2 = work + C;
    for (int64_t c = 0; c < C; c++) {
        gain[c] = (A)(weight == NULL ? (double)invstd[c] : (double)invstd[c] * (double)weight[c]);
        zero[c] = (A)0;
    }
    int status = 0;
    const int fused = FUSES_DX && sums && dx != NULL;
    if (sums) status = FN(sums)(x, dy, fused ? dx : NULL, fused ? gain : NULL, B, C, S, mean, s1, s2);
    if (status == 0 && dx != NULL && !fused) FN(affine)(dy, dx, B, C, S, zero, gain, zero);
    if (status == 0 && sums) {
        for (int64_t c = 0; c < C; c++) {
            grad_bias[c] = (A)s1[c];
            grad_weight[c] = (A)(s2[c] * (double)invstd[c]);
        }
    }
    free(acc);
    free(work);
    return status;
}
