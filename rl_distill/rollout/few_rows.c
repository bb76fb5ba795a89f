/* Native float32 decode kernels for CPU (issue #18): few-row products with a panel-packed weight, and
 * whole Llama decoder layers for one new token per row built on them.
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
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#define NB 48
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

int few_rows_panel_width(void) { return NB; }

/* y[m, 0:ncols] = x[m] . panel (+ bias); with accumulate, y[m, j] += that (a residual add). */
static inline __attribute__((always_inline)) void panel(const int mr, const float *restrict x, long ldx,
                                                        const float *restrict p, long k_dim, float *restrict y,
                                                        long ldy, int ncols, const float *restrict bias,
                                                        const int accumulate) {
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
      for (int j = 0; j < ncols; ++j) out[j] += bias[j];
    if (accumulate)
      for (int j = 0; j < ncols; ++j) row[j] += out[j];
    else
      for (int j = 0; j < ncols; ++j) row[j] = out[j];
  }
}

/* The panels of one product, split over the threads of the enclosing parallel region (an orphaned
 * worksharing loop; its implicit barrier ends the product). */
static void product(const float *x, long ldx, const float *packed, const float *bias, float *y, long ldy, long m_dim,
                    long n_dim, long k_dim, const int accumulate) {
  const long panels = (n_dim + NB - 1) / NB;
#pragma omp for schedule(static)
  for (long p = 0; p < panels; ++p) {
    const int ncols = (int)(n_dim - p * NB < NB ? n_dim - p * NB : NB);
    const float *block = packed + p * k_dim * NB;
    const float *b = bias ? bias + p * NB : NULL;
    for (long m0 = 0; m0 < m_dim; m0 += 8) {
      const float *xs = x + m0 * ldx;
      float *ys = y + m0 * ldy + p * NB;
      switch (m_dim - m0 < 8 ? (int)(m_dim - m0) : 8) {
        case 1: panel(1, xs, ldx, block, k_dim, ys, ldy, ncols, b, accumulate); break;
        case 2: panel(2, xs, ldx, block, k_dim, ys, ldy, ncols, b, accumulate); break;
        case 3: panel(3, xs, ldx, block, k_dim, ys, ldy, ncols, b, accumulate); break;
        case 4: panel(4, xs, ldx, block, k_dim, ys, ldy, ncols, b, accumulate); break;
        case 5: panel(5, xs, ldx, block, k_dim, ys, ldy, ncols, b, accumulate); break;
        case 6: panel(6, xs, ldx, block, k_dim, ys, ldy, ncols, b, accumulate); break;
        case 7: panel(7, xs, ldx, block, k_dim, ys, ldy, ncols, b, accumulate); break;
        default: panel(8, xs, ldx, block, k_dim, ys, ldy, ncols, b, accumulate); break;
      }
    }
  }
}

/* x: (M, K) rows with stride ldx; packed: (ceil(N / 48), K, 48); y: (M, N) rows with stride ldy;
 * bias: N floats or NULL; threads: OpenMP threads (>= 1). */
void few_rows_f32(const float *x, long ldx, const float *packed, const float *bias, float *y, long ldy, long m_dim,
                  long n_dim, long k_dim, int threads) {
#pragma omp parallel num_threads(threads)
  product(x, ldx, packed, bias, y, ldy, m_dim, n_dim, k_dim, 0);
}

/* ---- Whole decoder layers ------------------------------------------------------------------------------
 *
 * decode_layers_f32 runs the decoder layers of a Llama-family model (Transformers' LlamaDecoderLayer) for one
 * new token per row, in one parallel region: per layer RMSNorm, the fused q/k/v product, the rotary embedding
 * of q and k, the new key and value written into column `used` of the layer's key/value buffers, attention of
 * each query head over columns 0..used of its grouped key/value head under an additive mask, o_proj added to
 * the residual stream, RMSNorm, the fused gate/up product, SiLU(gate) * up, down_proj added to the residual.
 * The caller (rl_distill/rollout/fused_step.py) embeds the tokens before and applies the final norm and the
 * head after. */

typedef struct {
  const float *norm_in, *qkv, *qkv_bias, *o, *o_bias, *norm_post, *gate_up, *gate_up_bias, *down, *down_bias;
  float *keys, *values; /* (M, kv_heads, cap, dim) buffers: column `used` is written */
  long cap;
  float eps_in, eps_post;
} decode_layer_t;

int decode_layer_struct_size(void) { return (int)sizeof(decode_layer_t); }

/* e^x in float32 from arithmetic only (so that loops of it vectorise without -ffast-math): x = n ln2 + r
 * with |r| <= ln2 / 2, e^r by a degree-7 polynomial (Cephes' expf coefficients), 2^n from the exponent
 * bits. About 1 ulp; 0 below -87.3 (so e^-inf = 0), clamped at the top (arguments here are <= 0 or SiLU's). */
static inline float exp_f32(float x) {
  const float under = x < -87.33654f ? 0.0f : 1.0f;
  x = x < -87.33654f ? -87.33654f : x > 88.37626f ? 88.37626f : x;
  const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
  const float t = x * 1.44269504088896341f + magic;
  const float n = t - magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int bits = ((int)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return p * scale * under;
}

/* out[m] = h[m] / sqrt(mean(h[m]^2) + eps) * weight (Llama's RMSNorm in float32), rows over the threads. */
static void rms_norm_rows(const float *h, float *out, const float *weight, float eps, long m_dim, long hidden) {
#pragma omp for schedule(static)
  for (long m = 0; m < m_dim; ++m) {
    const float *row = h + m * hidden;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (long i = 0; i < hidden; ++i) sum += row[i] * row[i];
    const float scale = 1.0f / sqrtf(sum / (float)hidden + eps);
    float *o = out + m * hidden;
#pragma omp simd
    for (long i = 0; i < hidden; ++i) o[i] = row[i] * scale * weight[i];
  }
}

/* x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[half:], x[:half]) (Transformers' rotary embedding). */
static inline void rotate(const float *restrict x, const float *restrict cos, const float *restrict sin,
                          float *restrict out, long dim) {
  const long half = dim / 2;
#pragma omp simd
  for (long i = 0; i < half; ++i) out[i] = x[i] * cos[i] - x[i + half] * sin[i];
#pragma omp simd
  for (long i = half; i < dim; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

/* Rotary embedding, cache write and attention for every (row, key/value head) pair over the threads. */
static void attention(const decode_layer_t *layer, const float *qkv, float *out, long m_dim, long heads,
                      long kv_heads, long dim, const float *cos, const float *sin, const float *mask, long used,
                      float scaling, float *scores, float *q_rot) {
  const long qkv_n = (heads + 2 * kv_heads) * dim, group = heads / kv_heads, columns = used + 1;
#pragma omp for schedule(static)
  for (long pair = 0; pair < m_dim * kv_heads; ++pair) {
    const long m = pair / kv_heads, g = pair % kv_heads;
    const float *row = qkv + m * qkv_n, *c = cos + m * dim, *s = sin + m * dim, *mrow = mask + m * columns;
    const long offset = (m * kv_heads + g) * layer->cap * dim;
    const float *keys = layer->keys + offset, *values = layer->values + offset;
    rotate(row + (heads + g) * dim, c, s, layer->keys + offset + used * dim, dim);
    memcpy(layer->values + offset + used * dim, row + (heads + kv_heads + g) * dim, dim * sizeof(float));
    for (long j = g * group; j < (g + 1) * group; ++j) {
      rotate(row + j * dim, c, s, q_rot, dim);
      float top = -INFINITY;
      for (long t = 0; t < columns; ++t) {
        if (mrow[t] == -INFINITY) {
          scores[t] = -INFINITY;
          continue;
        }
        const float *k = keys + t * dim;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (long i = 0; i < dim; ++i) dot += q_rot[i] * k[i];
        scores[t] = dot * scaling + mrow[t];
        top = scores[t] > top ? scores[t] : top;
      }
      float *o = out + m * heads * dim + j * dim;
      for (long i = 0; i < dim; ++i) o[i] = 0.0f;
      if (top == -INFINITY) continue; /* every column masked: zeros, as PyTorch's attention */
      float total = 0.0f;
#pragma omp simd reduction(+ : total)
      for (long t = 0; t < columns; ++t) {
        scores[t] = exp_f32(scores[t] - top);
        total += scores[t];
      }
      for (long t = 0; t < columns; ++t) {
        if (scores[t] == 0.0f) continue;
        const float weight = scores[t] / total, *v = values + t * dim;
#pragma omp simd
        for (long i = 0; i < dim; ++i) o[i] += weight * v[i];
      }
    }
  }
}

/* act[m] = SiLU(gate_up[m, :inter]) * gate_up[m, inter:], rows over the threads. */
static void silu_mul(const float *gate_up, float *act, long m_dim, long inter) {
#pragma omp for schedule(static)
  for (long m = 0; m < m_dim; ++m) {
    const float *gate = gate_up + m * 2 * inter, *up = gate + inter;
    float *a = act + m * inter;
#pragma omp simd
    for (long i = 0; i < inter; ++i) a[i] = gate[i] / (1.0f + exp_f32(-gate[i])) * up[i];
  }
}

/* h: (M, hidden) residual stream, updated in place; cos, sin: (M, dim); mask: (M, used + 1) additive (0 or
 * -inf). Returns 0, or -1 when a scratch allocation failed (h is then unchanged only if layer 0 never ran). */
int decode_layers_f32(const decode_layer_t *layers, int n_layers, float *h, long m_dim, long hidden, long heads,
                      long kv_heads, long dim, long inter, const float *cos, const float *sin, const float *mask,
                      long used, float scaling, int threads) {
  const long qkv_n = (heads + 2 * kv_heads) * dim;
  float *x = malloc(sizeof(float) * m_dim * hidden), *qkv = malloc(sizeof(float) * m_dim * qkv_n),
        *att = malloc(sizeof(float) * m_dim * heads * dim), *gate_up = malloc(sizeof(float) * m_dim * 2 * inter),
        *act = malloc(sizeof(float) * m_dim * inter);
  int failed = !(x && qkv && att && gate_up && act);
  if (!failed) {
#pragma omp parallel num_threads(threads)
    {
      float *scores = malloc(sizeof(float) * (used + 1)), *q_rot = malloc(sizeof(float) * dim);
      if (!scores || !q_rot) {
#pragma omp atomic write
        failed = 1;
      }
#pragma omp barrier
      if (!failed)
        for (int l = 0; l < n_layers; ++l) {
          const decode_layer_t *layer = layers + l;
          rms_norm_rows(h, x, layer->norm_in, layer->eps_in, m_dim, hidden);
          product(x, hidden, layer->qkv, layer->qkv_bias, qkv, qkv_n, m_dim, qkv_n, hidden, 0);
          attention(layer, qkv, att, m_dim, heads, kv_heads, dim, cos, sin, mask, used, scaling, scores, q_rot);
          product(att, heads * dim, layer->o, layer->o_bias, h, hidden, m_dim, hidden, heads * dim, 1);
          rms_norm_rows(h, x, layer->norm_post, layer->eps_post, m_dim, hidden);
          product(x, hidden, layer->gate_up, layer->gate_up_bias, gate_up, 2 * inter, m_dim, 2 * inter, hidden, 0);
          silu_mul(gate_up, act, m_dim, inter);
          product(act, inter, layer->down, layer->down_bias, h, hidden, m_dim, hidden, inter, 1);
        }
      free(scores);
      free(q_rot);
    }
  }
  free(x);
  free(qkv);
  free(att);
  free(gate_up);
  free(act);
  return failed ? -1 : 0;
}
