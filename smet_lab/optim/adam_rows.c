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
   theta is the compact values [K, B] (rows NULL) or the dense weights, block k at row rows[k].
   The per-cohort coefficients are tables of C <= 256 floats read with the 1-byte id: the compiler turns
   the three lookups into vector gathers (Inductor emits scalar loops for them, ~3.5 x slower).
   Built by fused.py with the machine's C compiler (-O3 -march=native -fopenmp -ffp-contract=off: every
   fused multiply-add is written out, where torch's kernels have one) at first use, with the two index
   helpers of the dense-weights layout below (exact: they move values, one add at most). */
#include <math.h>
#include <stdint.h>

/* SPLIT: the descent rounds twice (dense weights at B = 1, as torch's 1-D index_add_ with alpha).
   PHASE 0: the whole step. 1 and 2: the step around torch's own sqrt, bit for bit the eager ops (the
   only rounding above that differs from theirs is sqrtf's, correctly rounded where torch's CPU sqrt is
   not always): 1 updates m and v and writes q = v / bc2, the caller takes torch's sqrt of q in place,
   2 descends with it. */
#define ENTRY(i, c, t, SPLIT, PHASE)                                          \
    {                                                                         \
        float mi = m[i], vi = v[i];                                           \
        const float warm = tw[c];                                             \
        if (PHASE != 2) {                                                     \
            const float gi = g[i];                                            \
            mi = fmaf(w1, gi - mi, mi);                                       \
            vi = fmaf(gi * w2, gi, vi * b2);                                  \
            mi *= damping ? warm : 1.0f;                                      \
            m[i] = mi;                                                        \
            v[i] = vi;                                                        \
        }                                                                     \
        if (PHASE == 1) {                                                     \
            q[i] = vi / t2[c];                                                \
        } else {                                                              \
            const float root = PHASE == 2 ? q[i] : sqrtf(vi / t2[c]);         \
            float u = fmaf(wd, theta[t], (mi / t1[c]) / (root + eps));        \
            u *= damping ? 1.0f : warm;                                       \
            theta[t] = SPLIT ? theta[t] + -lr * u : fmaf(-lr, u, theta[t]);  \
        }                                                                     \
    }

/* COH: per-block cohort ids (else every entry reads column 0); ROWS: dense weights via rows[k]. */
#define LOOPS(COH, ROWS, PHASE)                                                            \
    if (B == 1) {                                                                          \
        _Pragma("omp parallel for simd num_threads(nthreads) schedule(static)")          \
        for (int64_t k = 0; k < K; k++)                                                    \
            ENTRY(k, (COH ? cohort[k] : 0), (ROWS ? (int64_t)rows[k] : k), ROWS, PHASE)    \
    } else {                                                                               \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static)")               \
        for (int64_t k = 0; k < K; k++) {                                                  \
            const int c = COH ? cohort[k] : 0;                                             \
            const int64_t base = (ROWS ? (int64_t)rows[k] : k) * B;                        \
            _Pragma("omp simd")                                                           \
            for (int64_t j = 0; j < B; j++)                                                \
                ENTRY(k * B + j, c, base + j, 0, PHASE)                                    \
        }                                                                                  \
    }

void smet_adam_rows(int64_t K, int64_t B, const float* restrict g, float* restrict m,
                    float* restrict v, float* restrict theta, const int32_t* restrict rows,
                    const uint8_t* restrict cohort, const float* t1, const float* t2,
                    const float* tw, float lr, float w1, float b2, float w2, float eps,
                    float wd, int damping, float* restrict q, int phase, int nthreads) {
    const int coh = cohort != 0, dense = rows != 0;
    if (phase == 1) { LOOPS(coh, 0, 1) }  /* the exact phases branch at run time: a shorter build */
    else if (phase == 2) { LOOPS(coh, dense, 2) }
    else if (cohort && rows) { LOOPS(1, 1, 0) }
    else if (cohort) { LOOPS(1, 0, 0) }
    else if (rows) { LOOPS(0, 1, 0) }
    else { LOOPS(0, 0, 0) }
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
   chunk's rows, without the shifted copy of the rows that torch's index_select needs. */
#define GATHER(OP)                                                                          \
    if (B == 1) {                                                                       \
        _Pragma("omp parallel for simd num_threads(nthreads) schedule(static)")       \
        for (int64_t k = 0; k < K; k++) OP(k, rows[k] - shift)                          \
    } else {                                                                            \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static)")            \
        for (int64_t k = 0; k < K; k++)                                                 \
            for (int64_t j = 0; j < B; j++) OP(k * B + j, (rows[k] - shift) * B + j)    \
    }
#define COPY(dst, src) out[dst] = grad[src];
#define ADD(dst, src) out[dst] += grad[src];

void smet_gather_rows(int64_t K, int64_t B, const float* restrict grad, const int32_t* restrict rows,
                      int64_t shift, float* restrict out, int accumulate, int nthreads) {
    if (accumulate) GATHER(ADD)
    else GATHER(COPY)
}
