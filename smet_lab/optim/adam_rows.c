/* The compact state's Adam step on CPU as one pass over the active entries, or as two around torch's
   own sqrt for optim.kernel=eager's bits (see fused.py).

   Per entry i of block k (B entries per block; cohort and row per block):
       m = lerp(m, g, 1 - b1)                 exactly torch's vectorised lerp: fma(w1, g - m, m)
       v = v * b2 + (1 - b2) * g * g          exactly torch's mul_ + addcmul_: fma(w2 * g, g, v * b2)
       c = cohort[k] (0 without cohorts);  m *= warm[c] if damping
       u = (m / bc1[c]) / (sqrt(v / bc2[c]) + eps) + wd * theta     fma, as torch's add_(theta, alpha=wd)
       u *= warm[c] unless damping
       theta -= lr * u                        fma(-lr, u, theta), as torch's add_(u, alpha=-lr) and its
                                              index_add_ of rows; two roundings as its 1-D index_add_
                                              (dense weights, B = 1)
   theta is the compact values [K, B] (rows NULL) or the dense weights, block k at row rows[k].
   The per-cohort coefficients are tables of C <= 256 floats read with the 1-byte id: the compiler turns
   the three lookups into vector gathers (Inductor emits scalar loops for them, ~3.5 x slower).
   Built by cbuild.py with the machine's C compiler (-O3 -march=native -fopenmp -ffp-contract=off: every
   fused multiply-add is written out, where torch's kernels have one) at first use and cached, with the
   two index helpers of the dense-weights layout below (exact: they move values, one add at most). */
#include <math.h>
#include <stdint.h>

/* PHASE 0: the whole step. 1 and 2: the step around torch's own sqrt, bit for bit the eager ops (the
   only rounding above that differs from theirs is sqrtf's, correctly rounded where torch's CPU sqrt is
   not always): 1 updates m and v and writes q = v / bc2, the caller takes torch's sqrt of q in place,
   2 descends with it. The update u of entry i with weight TH goes to OUT (THETA: into the weight). */
#define ENTRY(i, c, TH, OUT, PHASE, WD, DAMP)                                                      \
    {                                                                                              \
        float mi = m[i], vi = v[i];                                                                \
        if (PHASE != 2) {                                                                          \
            const float gi = g[i];                                                                 \
            mi = fmaf(w1, gi - mi, mi);                                                            \
            vi = fmaf(gi * w2, gi, vi * b2);                                                       \
            mi *= DAMP ? tw[c] : 1.0f;                                                             \
            m[i] = mi;                                                                             \
            v[i] = vi;                                                                             \
        }                                                                                          \
        if (PHASE == 1) {                                                                          \
            q[i] = vi / t2[c];                                                                     \
        } else {                                                                                   \
            const float root = PHASE == 2 ? q[i] : sqrtf(vi / t2[c]);                              \
            const float a = (mi / t1[c]) / (root + eps);                                           \
            const float u = (WD ? fmaf(wd, TH, a) : a) * (DAMP ? 1.0f : tw[c]);                    \
            OUT(TH, u);                                                                            \
        }                                                                                          \
    }
#define THETA(th, u) th = fmaf(-lr, u, th)
#define TO_TILE(th, u) tile[j] = u

/* COH: per-block cohort ids (else every entry reads column 0); ROWS: dense weights via rows[k].
   Dense weights at B = 1 descend in tiles: a vectorised pass computes the tile's updates, a scalar one
   adds them at their rows in two roundings, as torch's 1-D index_add_ with alpha does (and AVX2 has no
   scatter store: one loop for both would stay scalar). */
#define TILE 256
#define LOOPS(COH, ROWS, PHASE, WD, DAMP)                                                          \
    if (B == 1 && ROWS && PHASE != 1) {                                                            \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                         \
        for (int64_t k0 = 0; k0 < K; k0 += TILE) {                                                 \
            const int64_t n = K - k0 < TILE ? K - k0 : TILE;                                       \
            float tile[TILE];                                                                      \
            _Pragma("omp simd")                                                                    \
            for (int64_t j = 0; j < n; j++)                                                        \
                ENTRY(k0 + j, (COH ? cohort[k0 + j] : 0), (WD ? theta[rows[k0 + j]] : 0.0f),       \
                      TO_TILE, PHASE, WD, DAMP)                                                  \
            for (int64_t j = 0; j < n; j++)                                                        \
                theta[rows[k0 + j]] += -lr * tile[j];                                              \
        }                                                                                          \
    } else if (B == 1) {                                                                           \
        _Pragma("omp parallel for simd num_threads(nthreads) schedule(static)")                    \
        for (int64_t k = 0; k < K; k++)                                                            \
            ENTRY(k, (COH ? cohort[k] : 0), theta[k], THETA, PHASE, WD, DAMP)                      \
    } else {                                                                                       \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                         \
        for (int64_t k = 0; k < K; k++) {                                                          \
            const int c = COH ? cohort[k] : 0;                                                     \
            float* restrict th = theta + (ROWS ? (int64_t)rows[k] : k) * B;                        \
            _Pragma("omp simd")                                                                    \
            for (int64_t j = 0; j < B; j++)                                                        \
                ENTRY(k * B + j, c, th[j], THETA, PHASE, WD, DAMP)                                 \
        }                                                                                          \
    }

void smet_adam_rows(int64_t K, int64_t B, const float* restrict g, float* restrict m,
                    float* restrict v, float* restrict theta, const int32_t* restrict rows,
                    const uint8_t* restrict cohort, const float* t1, const float* t2,
                    const float* tw, float lr, float w1, float b2, float w2, float eps,
                    float wd, int damping, float* restrict q, int phase, int nthreads) {
    /* Every choice a loop makes per entry is a compile-time constant: a select in the loop keeps GCC
       from vectorising it for AVX2 (AVX-512's masks hid that: 4.5 x slower on a Zen 3 EPYC). COH and
       ROWS as above; WD: the weight decay term only where wd != 0, as the eager step adds it only then;
       DAMP: the warm-up on m, else on u. */
#define LAYOUTS(PHASE, WD, DAMP)                               \
    if (cohort && rows) { LOOPS(1, 1, PHASE, WD, DAMP) }       \
    else if (cohort) { LOOPS(1, 0, PHASE, WD, DAMP) }          \
    else if (rows) { LOOPS(0, 1, PHASE, WD, DAMP) }            \
    else { LOOPS(0, 0, PHASE, WD, DAMP) }
#define PHASES(DAMP)                                                          \
    if (phase == 1 && cohort) { LOOPS(1, 0, 1, 0, DAMP) }                     \
    else if (phase == 1) { LOOPS(0, 0, 1, 0, DAMP) }                          \
    else if (wd != 0.0f) { if (phase == 2) { LAYOUTS(2, 1, DAMP) } else { LAYOUTS(0, 1, DAMP) } } \
    else if (phase == 2) { LAYOUTS(2, 0, DAMP) }                              \
    else { LAYOUTS(0, 0, DAMP) }
    if (damping) { PHASES(1) } else { PHASES(0) }
}

/* rows[k] = base + 256 * (chunk of k) + offsets[k]: the chunked position list (sparse/layer.py)
   decoded in one pass, as topology.padded_ids + base does in three. */
void smet_decode_rows(int64_t n_chunks, const int16_t* restrict counts, const uint8_t* restrict offsets,
                      int64_t base, int32_t* restrict rows) {
    int64_t k = 0;
    for (int64_t j = 0; j < n_chunks; j++) {
        const int32_t chunk = (int32_t)(base + 256 * j);
        for (const int64_t end = k + counts[j]; k < end; k++)
            rows[k] = chunk + offsets[k];
    }
}

/* out[k] (+)= grad[rows[k] - shift] (blocks of B): a layer's gradient gathered with its part of the
   chunk's rows, without the shifted copy of the rows that torch's index_select needs. Scalar loads:
   AVX2's gather instruction is slower here (Zen 3, 1M of 4M floats: 2.3 ms against 0.95, and
   torch's index_select 1.3). */
#if defined(__GNUC__) && !defined(__clang__)
#define SCALAR __attribute__((optimize("no-tree-vectorize")))
#else
#define SCALAR
#endif
#define GATHER(OP)                                                                          \
    if (B == 1) {                                                                       \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static)")            \
        for (int64_t k = 0; k < K; k++) OP(k, rows[k] - shift)                          \
    } else {                                                                            \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static)")            \
        for (int64_t k = 0; k < K; k++)                                                 \
            for (int64_t j = 0; j < B; j++) OP(k * B + j, (rows[k] - shift) * B + j)    \
    }
#define COPY(dst, src) out[dst] = grad[src];
#define ADD(dst, src) out[dst] += grad[src];

SCALAR void smet_gather_rows(int64_t K, int64_t B, const float* restrict grad, const int32_t* restrict rows,
                      int64_t shift, float* restrict out, int accumulate, int nthreads) {
    if (accumulate) GATHER(ADD)
    else GATHER(COPY)
}
