/* Native O(nnz) kernels of the SHiRA tuner (fp32, CPU). Compiled at first use by
 * shira_export/_native/__init__.py with the system C compiler; the torch ops are the
 * fallback when no compiler is there. No Python API: called through ctypes with raw
 * pointers to contiguous tensors. */
#include <stdint.h>
#include <stdlib.h>

/* ---- values gradient: out[dest[k]] = sum_t a[t, row(k)] * b[t, col(k)] ----------------
 * a [T, n_a] and b [T, n_b] row-major, as autograd hands them over (no transposed copies).
 * Tokens go in blocks of TB and b's columns in blocks of CB: per token block, a thread
 * transposes its rows of a into aT [rows, TB] (L2), then for each column block transposes
 * b's tile into bt [CB, TB] (64 KiB) and walks the nonzeros of that block. Every dot
 * reads a's row from registers and b's from the tile, four nonzeros at a time: about
 * twice the multiply-adds per cycle of one length-T dot per nonzero over transposed
 * copies, which waits on L2/L3. CB = 256 measured 5-10 % faster than L1-sized tiles
 * (64-128): more nonzeros per visit of a row. The pattern comes grouped by column block:
 * the nonzeros of row i in block cb are bptr[cb * (n_a + 1) + i] .. [+ 1] (absolute),
 * bcol[k] = col - cb * CB (uint8: CB <= 256), dest[k] = where result k goes. */
#define TB 64
#define CB 256

#if defined(__AVX2__) && defined(__FMA__) && !defined(SHIRA_GENERIC)
#include <immintrin.h>

/* dst[c * ldd + t] = src[t * lds + c]: 8x8 blocks through registers */
static inline void transpose8(const float *s, int64_t lds, float *d, int64_t ldd) {
    __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + lds), r2 = _mm256_loadu_ps(s + 2 * lds);
    __m256 r3 = _mm256_loadu_ps(s + 3 * lds), r4 = _mm256_loadu_ps(s + 4 * lds), r5 = _mm256_loadu_ps(s + 5 * lds);
    __m256 r6 = _mm256_loadu_ps(s + 6 * lds), r7 = _mm256_loadu_ps(s + 7 * lds);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3);
    __m256 t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(d + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(d + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(d + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(d + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(d + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(d + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(d + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#define HAVE_TRANSPOSE8 1

static inline __m128 hsum4(__m256 s0, __m256 s1, __m256 s2, __m256 s3) {
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* b[0..TB) . (a0..a7) into two accumulator chains (one chain waits on FMA latency) */
#define DOT64(lo, hi, b) do {                                                                            \
        lo = _mm256_fmadd_ps(a0, _mm256_load_ps(b), lo); hi = _mm256_fmadd_ps(a1, _mm256_load_ps((b) + 8), hi);      \
        lo = _mm256_fmadd_ps(a2, _mm256_load_ps((b) + 16), lo); hi = _mm256_fmadd_ps(a3, _mm256_load_ps((b) + 24), hi); \
        lo = _mm256_fmadd_ps(a4, _mm256_load_ps((b) + 32), lo); hi = _mm256_fmadd_ps(a5, _mm256_load_ps((b) + 40), hi); \
        lo = _mm256_fmadd_ps(a6, _mm256_load_ps((b) + 48), lo); hi = _mm256_fmadd_ps(a7, _mm256_load_ps((b) + 56), hi); \
    } while (0)

/* acc[k] += ai . bt[bcol[k]] for k in [k, k_end): a's row stays in 8 registers */
static void dots_row(const float *ai, const float *bt, const uint8_t *bcol, int64_t k, int64_t k_end, float *acc) {
    const __m256 a0 = _mm256_load_ps(ai), a1 = _mm256_load_ps(ai + 8), a2 = _mm256_load_ps(ai + 16);
    const __m256 a3 = _mm256_load_ps(ai + 24), a4 = _mm256_load_ps(ai + 32), a5 = _mm256_load_ps(ai + 40);
    const __m256 a6 = _mm256_load_ps(ai + 48), a7 = _mm256_load_ps(ai + 56);
    for (; k + 4 <= k_end; k += 4) {
        const float *b0 = bt + bcol[k] * TB, *b1 = bt + bcol[k + 1] * TB;
        const float *b2 = bt + bcol[k + 2] * TB, *b3 = bt + bcol[k + 3] * TB;
        __m256 p0 = _mm256_setzero_ps(), q0 = p0, p1 = p0, q1 = p0, p2 = p0, q2 = p0, p3 = p0, q3 = p0;
        DOT64(p0, q0, b0); DOT64(p1, q1, b1); DOT64(p2, q2, b2); DOT64(p3, q3, b3);
        const __m128 s = hsum4(_mm256_add_ps(p0, q0), _mm256_add_ps(p1, q1), _mm256_add_ps(p2, q2), _mm256_add_ps(p3, q3));
        _mm_storeu_ps(acc + k, _mm_add_ps(_mm_loadu_ps(acc + k), s));
    }
    for (; k < k_end; ++k) {
        const float *b0 = bt + bcol[k] * TB;
        __m256 p0 = _mm256_setzero_ps(), q0 = p0;
        DOT64(p0, q0, b0);
        acc[k] += _mm_cvtss_f32(hsum4(_mm256_add_ps(p0, q0), p0, p0, p0));
    }
}
#else
static void dots_row(const float *ai, const float *bt, const uint8_t *bcol, int64_t k, int64_t k_end, float *acc) {
    for (; k < k_end; ++k) {
        const float *bk = bt + bcol[k] * TB;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int t = 0; t < TB; ++t) s += ai[t] * bk[t];
        acc[k] += s;
    }
}
#endif

/* dst[c * TB + t] = src[t * lds + c] for t < rows, c < cols; zeros for rows <= t < TB */
static void tile_transpose(const float *src, int64_t lds, int64_t rows, int64_t cols, float *dst) {
    int64_t r8 = 0, c8 = 0;
#ifdef HAVE_TRANSPOSE8
    r8 = rows & ~(int64_t)7;
    c8 = cols & ~(int64_t)7;
    for (int64_t t = 0; t < r8; t += 8)  /* rows outer: the reads stream (2x faster on wide rows) */
        for (int64_t c = 0; c < c8; c += 8) transpose8(src + t * lds + c, lds, dst + c * TB + t, TB);
#endif
    for (int64_t t = 0; t < rows; ++t)
        for (int64_t c = t < r8 ? c8 : 0; c < cols; ++c) dst[c * TB + t] = src[t * lds + c];
    for (int64_t c = 0; c < cols; ++c)
        for (int64_t t = rows; t < TB; ++t) dst[c * TB + t] = 0.0f;
}

/* first row r with crow[r] >= target */
static int64_t lower_row(const int64_t *crow, int64_t n_rows, int64_t target) {
    int64_t lo = 0, hi = n_rows;
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (crow[mid] < target) lo = mid + 1; else hi = mid;
    }
    return lo;
}

static void sddmm_rows(const float *a, int64_t n_a, const float *b, int64_t n_b, int64_t T, const int64_t *bptr,
                       const uint8_t *bcol, int64_t r0, int64_t r1, float *aT, float *bt, float *acc) {
    const int64_t n_cb = (n_b + CB - 1) / CB;
    for (int64_t t0 = 0; t0 < T; t0 += TB) {
        const int64_t tb = T - t0 < TB ? T - t0 : TB;
        tile_transpose(a + t0 * n_a + r0, n_a, tb, r1 - r0, aT);
        for (int64_t cb = 0; cb < n_cb; ++cb) {
            const int64_t *ptr = bptr + cb * (n_a + 1);
            if (ptr[r1] == ptr[r0]) continue;
            const int64_t c0 = cb * CB;
            tile_transpose(b + t0 * n_b + c0, n_b, tb, n_b - c0 < CB ? n_b - c0 : CB, bt);
            for (int64_t i = r0; i < r1; ++i)
                if (ptr[i + 1] > ptr[i]) dots_row(aT + (i - r0) * TB, bt, bcol, ptr[i], ptr[i + 1], acc);
        }
    }
}

/* Threads take ranges of a's rows with equal shares of nonzeros (crow: plain CSR row
 * pointers over a's rows). OpenMP: linked against the libgomp.so.1 torch has loaded, so
 * the work goes to torch's own pool; threads of our own would compete with it.
 * Returns 0, -1 when out of memory, -2 when block_cols is not this build's CB. */
int shira_sddmm_f32(const float *a, int64_t n_a, const float *b, int64_t n_b, int64_t T, const int64_t *crow,
                    const int64_t *bptr, const uint8_t *bcol, const int32_t *dest, int64_t block_cols, float *out,
                    int n_threads) {
    if (block_cols != CB) return -2;
    const int64_t nnz = crow[n_a];
    const int64_t n_ptr = (n_b + CB - 1) / CB * (n_a + 1);
    for (int64_t q = 0; q < n_ptr; ++q)  /* every nonzero range lies within [0, nnz) */
        if (bptr[q] < 0 || bptr[q] > nnz) return -3;
    float *acc = calloc(nnz > 0 ? (size_t)nnz : 1, sizeof(float));
    if (!acc) return -1;
    if (n_threads < 1 || nnz < 4096) n_threads = 1;
    int failed = 0, bad = 0;
#pragma omp parallel for num_threads(n_threads) schedule(static, 1) reduction(| : failed, bad)
    for (int th = 0; th < n_threads; ++th) {
        const int64_t r0 = th == 0 ? 0 : lower_row(crow, n_a, nnz * th / n_threads);
        const int64_t r1 = th == n_threads - 1 ? n_a : lower_row(crow, n_a, nnz * (th + 1) / n_threads);
        const size_t a_bytes = ((size_t)(r1 - r0) * TB * sizeof(float) + 63) / 64 * 64;
        float *scratch = aligned_alloc(64, a_bytes + CB * TB * sizeof(float));
        if (!scratch) { failed = 1; continue; }
        sddmm_rows(a, n_a, b, n_b, T, bptr, bcol, r0, r1, scratch, scratch + a_bytes / sizeof(float), acc);
        free(scratch);
        const int64_t n_cb = (n_b + CB - 1) / CB;
        for (int64_t cb = 0; cb < n_cb; ++cb)  /* this thread's results to their places */
            for (int64_t k = bptr[cb * (n_a + 1) + r0]; k < bptr[cb * (n_a + 1) + r1]; ++k) {
                if ((uint64_t)dest[k] < (uint64_t)nnz) out[dest[k]] = acc[k]; else bad = 1;
            }
    }
    free(acc);
    return failed ? -1 : bad ? -3 : 0;
}

/* ---- scatter: w[idx] = vals (merge, unmerge, the training merge) -------------------
 * Random writes bound by memory latency: two threads keep twice the misses in flight.
 * Positions are unique, so the threads never write the same element. */
#define PAR_MIN 16384

/* w[idx] = vals; a position outside [0, numel) is not written and makes it return -3 */
int shira_scatter_f32(float *w, int64_t numel, const int64_t *idx, const float *vals, int64_t n, int n_threads) {
    if (n_threads < 1 || n < PAR_MIN) n_threads = 1;
    int bad = 0;
#pragma omp parallel for num_threads(n_threads) schedule(static) reduction(| : bad)
    for (int64_t k = 0; k < n; ++k) {
        const int64_t p = idx[k];
        if ((uint64_t)p < (uint64_t)numel) w[p] = vals[k]; else bad = 1;
    }
    return bad ? -3 : 0;
}

/* ---- switch: restore one adapter's entries and write another's, block by block --------
 * Both position lists ascending. For each block of `block` weight elements, the old
 * support's saved entries are written back, then the new support's merged entries: the
 * block's cache lines are fetched once for both (two whole scatters fetch them twice,
 * the second time from L3 or memory). A position in both lists ends with the new value.
 * Threads take equal ranges of the weight: random writes are bound by the misses one
 * core keeps in flight, so two cores nearly halve the time. */
static int64_t lower_pos(const int32_t *idx, int64_t n, int64_t pos) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (idx[mid] < pos) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* Positions are int32 (weights under 2^31 elements): 4 bytes per nonzero less to read.
 * Ascending lists lie within [0, numel) when their ends do (-3 if not, nothing written);
 * a thread writes only inside its own range, so unsorted lists cannot write out of bounds
 * either (an entry left out makes it return -3). */
int shira_switch_f32(float *w, int64_t numel, const int32_t *old_idx, const float *old_vals, int64_t n_old,
                     const int32_t *new_idx, const float *new_vals, int64_t n_new, int64_t block, int n_threads) {
    if ((n_old && (old_idx[0] < 0 || old_idx[n_old - 1] >= numel)) ||
        (n_new && (new_idx[0] < 0 || new_idx[n_new - 1] >= numel)))
        return -3;
    if (n_threads < 1 || n_old + n_new < 4 * PAR_MIN) n_threads = 1;
    int64_t written = 0;
#pragma omp parallel for num_threads(n_threads) schedule(static, 1) reduction(+ : written)
    for (int t = 0; t < n_threads; ++t) {
        const int64_t lo = numel * t / n_threads, hi = numel * (t + 1) / n_threads;
        int64_t i = lower_pos(old_idx, n_old, lo), j = lower_pos(new_idx, n_new, lo);
        const int64_t i_end = lower_pos(old_idx, n_old, hi), j_end = lower_pos(new_idx, n_new, hi);
        for (int64_t end = lo + block; i < i_end || j < j_end; end += block) {
            for (; i < i_end && old_idx[i] < end; ++i)
                if (old_idx[i] >= lo && old_idx[i] < hi) { w[old_idx[i]] = old_vals[i]; ++written; }
            for (; j < j_end && new_idx[j] < end; ++j)
                if (new_idx[j] >= lo && new_idx[j] < hi) { w[new_idx[j]] = new_vals[j]; ++written; }
        }
    }
    return written == n_old + n_new ? 0 : -3;
}
