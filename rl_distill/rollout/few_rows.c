/* Few-row float32 products with a panel-packed weight, for decode steps on CPU (issue #18).
 *
 * y[m, n] = bias[n] + sum_k x[m, k] * W[n, k] for M rows (a decode batch), W an (N, K) nn.Linear weight
 * packed once into panels of NB = 48 output columns: panel p is a contiguous (K, 48) block holding
 * W[48p + j, k] at [k][j] (zero past N). Each panel is streamed once per block of up to 8 rows: per k,
 * three 16-float weight vectors times 8 broadcast inputs into 24 accumulators (8 x 48 outputs), so the
 * weight is read once from memory and the inputs from L1. Panels are split over OpenMP threads (the
 * caller's count; in a PyTorch process the same libgomp runtime as PyTorch's).
 *
 * Written with GCC/Clang vector extensions (no intrinsics): built with -march=native it compiles to
 * the machine's widest vectors; rl_distill builds it only where the CPU has AVX-512F (32 vector
 * registers hold the 24 accumulators). Loaded with ctypes by rl_distill/rollout/native.py, which checks
 * it against F.linear before use.
 */
#include <stddef.h>
#include <string.h>

#define NB 48
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

int few_rows_panel_width(void) { return NB; }

static inline __attribute__((always_inline)) void panel(const int mr, const float *restrict x, long ldx,
                                                        const float *restrict p, long k_dim, float *restrict y,
                                                        long ldy, int ncols, const float *restrict bias) {
  v16 a[8][3];
  for (int m = 0; m < mr; ++m) a[m][0] = a[m][1] = a[m][2] = (v16){0};
  for (long k = 0; k < k_dim; ++k) {
    const float *w = p + k * NB;
    const v16 w0 = *(const v16u *)w, w1 = *(const v16u *)(w + 16), w2 = *(const v16u *)(w + 32);
    for (int m = 0; m < mr; ++m) {
      const float xm = x[m * ldx + k];
      a[m][0] += xm * w0;
      a[m][1] += xm * w1;
      a[m][2] += xm * w2;
    }
  }
  for (int m = 0; m < mr; ++m) {
    float out[NB];
    memcpy(out, &a[m][0], sizeof(v16));
    memcpy(out + 16, &a[m][1], sizeof(v16));
    memcpy(out + 32, &a[m][2], sizeof(v16));
    float *row = y + m * ldy;
    if (bias)
      for (int j = 0; j < ncols; ++j) row[j] = out[j] + bias[j];
    else
      for (int j = 0; j < ncols; ++j) row[j] = out[j];
  }
}

/* x: (M, K) rows with stride ldx; packed: (ceil(N / 48), K, 48); y: (M, N) rows with stride ldy;
 * bias: N floats or NULL; threads: OpenMP threads (>= 1). */
void few_rows_f32(const float *x, long ldx, const float *packed, const float *bias, float *y, long ldy, long m_dim,
                  long n_dim, long k_dim, int threads) {
  const long panels = (n_dim + NB - 1) / NB;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long p = 0; p < panels; ++p) {
    const int ncols = (int)(n_dim - p * NB < NB ? n_dim - p * NB : NB);
    const float *block = packed + p * k_dim * NB;
    const float *b = bias ? bias + p * NB : NULL;
    for (long m0 = 0; m0 < m_dim; m0 += 8) {
      const float *xs = x + m0 * ldx;
      float *ys = y + m0 * ldy + p * NB;
      switch (m_dim - m0 < 8 ? (int)(m_dim - m0) : 8) {
        case 1: panel(1, xs, ldx, block, k_dim, ys, ldy, ncols, b); break;
        case 2: panel(2, xs, ldx, block, k_dim, ys, ldy, ncols, b); break;
        case 3: panel(3, xs, ldx, block, k_dim, ys, ldy, ncols, b); break;
        case 4: panel(4, xs, ldx, block, k_dim, ys, ldy, ncols, b); break;
        case 5: panel(5, xs, ldx, block, k_dim, ys, ldy, ncols, b); break;
        case 6: panel(6, xs, ldx, block, k_dim, ys, ldy, ncols, b); break;
        case 7: panel(7, xs, ldx, block, k_dim, ys, ldy, ncols, b); break;
        default: panel(8, xs, ldx, block, k_dim, ys, ldy, ncols, b); break;
      }
    }
  }
}
