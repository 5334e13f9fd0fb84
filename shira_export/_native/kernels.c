/* Native O(nnz) kernels of the SHiRA tuner (fp32, CPU). Compiled at first use by
 * shira_export/_native/__init__.py with the system C compiler; the torch ops are the
 * fallback when no compiler is there. No Python API: called through ctypes with raw
 * pointers to contiguous tensors. */
#include <stdint.h>

/* ---- values gradient: out[k] = dot(a[row(k)], b[col[k]]) over T -------------------- */
typedef struct {
    const float *a, *b;
    int64_t T;
    const int64_t *crow, *col;
    int64_t row_begin, row_end;
    float *out;
    const int64_t *perm; /* NULL, or where each CSR-ordered result goes */
} sddmm_job;

/* One dot product of length T per nonzero, four nonzeros of a row at a time: four
 * independent accumulator chains (one chain is bound by the FMA latency) and one load of
 * a's row per four dots. Blocking over T (so gathered rows of b stay in L2) measured
 * slower at T = 512: the horizontal sums per block cost more than the misses. */
static void sddmm_rows(const sddmm_job *j) {
    const int64_t T = j->T;
    for (int64_t i = j->row_begin; i < j->row_end; ++i) {
        const float *ai = j->a + i * T;
        int64_t k = j->crow[i];
        const int64_t k_end = j->crow[i + 1];
        for (; k + 4 <= k_end; k += 4) {
            const float *b0 = j->b + j->col[k] * T, *b1 = j->b + j->col[k + 1] * T;
            const float *b2 = j->b + j->col[k + 2] * T, *b3 = j->b + j->col[k + 3] * T;
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t t = 0; t < T; ++t) {
                const float av = ai[t];
                s0 += av * b0[t];
                s1 += av * b1[t];
                s2 += av * b2[t];
                s3 += av * b3[t];
            }
            if (j->perm) {
                j->out[j->perm[k]] = s0;
                j->out[j->perm[k + 1]] = s1;
                j->out[j->perm[k + 2]] = s2;
                j->out[j->perm[k + 3]] = s3;
            } else {
                j->out[k] = s0;
                j->out[k + 1] = s1;
                j->out[k + 2] = s2;
                j->out[k + 3] = s3;
            }
        }
        for (; k < k_end; ++k) {
            const float *bk = j->b + j->col[k] * T;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t t = 0; t < T; ++t) s += ai[t] * bk[t];
            j->out[j->perm ? j->perm[k] : k] = s;
        }
    }
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

/* a: [n_rows, T], b: [*, T] row-major; CSR (crow [n_rows+1], col [nnz]); out [nnz], in
 * CSR order or, with `perm`, out[perm[k]] (the transpose's results in the caller's order).
 * Rows are split between threads by equal shares of nonzeros. OpenMP: linked against
 * the libgomp.so.1 torch has loaded, so the work goes to torch's own (spinning) pool;
 * threads of our own would compete with it for the cores. */
int shira_sddmm_f32(const float *a, const float *b, int64_t T, const int64_t *crow, const int64_t *col,
                    int64_t n_rows, float *out, const int64_t *perm, int n_threads) {
    const int64_t nnz = crow[n_rows];
    if (n_threads < 1 || nnz < 4096) n_threads = 1;
#pragma omp parallel for num_threads(n_threads) schedule(static, 1)
    for (int t = 0; t < n_threads; ++t) {
        const int64_t begin = t == 0 ? 0 : lower_row(crow, n_rows, nnz * t / n_threads);
        const int64_t end = t == n_threads - 1 ? n_rows : lower_row(crow, n_rows, nnz * (t + 1) / n_threads);
        sddmm_job job = {a, b, T, crow, col, begin, end, out, perm};
        sddmm_rows(&job);
    }
    return 0;
}

/* ---- transient merge: saved = w[idx]; w[idx] = saved + vals, and the restore -------
 * Random reads/writes bound by memory latency: two threads keep twice the misses in
 * flight. Positions are unique, so the threads never write the same element. */
#define PAR_MIN 16384

int shira_swap_in_f32(float *w, const int64_t *idx, const float *vals, float *saved, int64_t n, int n_threads) {
    if (n_threads < 1 || n < PAR_MIN) n_threads = 1;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t k = 0; k < n; ++k) {
        const float s = w[idx[k]];
        saved[k] = s;
        w[idx[k]] = s + vals[k];
    }
    return 0;
}

/* w[idx] = vals */
int shira_scatter_f32(float *w, const int64_t *idx, const float *vals, int64_t n, int n_threads) {
    if (n_threads < 1 || n < PAR_MIN) n_threads = 1;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t k = 0; k < n; ++k) w[idx[k]] = vals[k];
    return 0;
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

/* Positions are int32 (weights under 2^31 elements): 4 bytes per nonzero less to read. */
int shira_switch_f32(float *w, int64_t numel, const int32_t *old_idx, const float *old_vals, int64_t n_old,
                     const int32_t *new_idx, const float *new_vals, int64_t n_new, int64_t block, int n_threads) {
    if (n_threads < 1 || n_old + n_new < 4 * PAR_MIN) n_threads = 1;
#pragma omp parallel for num_threads(n_threads) schedule(static, 1)
    for (int t = 0; t < n_threads; ++t) {
        const int64_t lo = numel * t / n_threads, hi = numel * (t + 1) / n_threads;
        int64_t i = lower_pos(old_idx, n_old, lo), j = lower_pos(new_idx, n_new, lo);
        const int64_t i_end = lower_pos(old_idx, n_old, hi), j_end = lower_pos(new_idx, n_new, hi);
        for (int64_t end = lo + block; i < i_end || j < j_end; end += block) {
            for (; i < i_end && old_idx[i] < end; ++i) w[old_idx[i]] = old_vals[i];
            for (; j < j_end && new_idx[j] < end; ++j) w[new_idx[j]] = new_vals[j];
        }
    }
    return 0;
}

/* dst [cols, rows] = src [rows, cols]^T through a 32x32 tile on the stack: each row
 * segment is read and written once, contiguously (transposing in place across rows
 * whose stride is a multiple of 4 KiB thrashes L1's sets: 512x3072 ran 25x slower). */
int shira_transpose_f32(const float *src, int64_t rows, int64_t cols, float *dst, int n_threads) {
    enum { B = 32 };
    const int64_t n_tiles = (cols + B - 1) / B;
    if (n_threads < 1 || rows * cols < (1 << 16)) n_threads = 1;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t tc = 0; tc < n_tiles; ++tc) {
        float tile[B][B];
        const int64_t c0 = tc * B, nc = c0 + B < cols ? B : cols - c0;
        for (int64_t r0 = 0; r0 < rows; r0 += B) {
            const int64_t nr = r0 + B < rows ? B : rows - r0;
            for (int64_t r = 0; r < nr; ++r)
                for (int64_t c = 0; c < nc; ++c) tile[c][r] = src[(r0 + r) * cols + c0 + c];
            for (int64_t c = 0; c < nc; ++c)
                for (int64_t r = 0; r < nr; ++r) dst[(c0 + c) * rows + r0 + r] = tile[c][r];
        }
    }
    return 0;
}
