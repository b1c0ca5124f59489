/* The work of a llama decoder layer around its attention, for a step of a few rows on
 * 4/8-bit weight blocks: one call before the attention, one after, instead of a dozen small
 * torch ops, whose dispatch costs more than their arithmetic when a step has a few rows.
 *
 * The arithmetic is the model's: RMS norm as x * (1 / sqrt(mean(x^2) + eps)) * weight, the
 * rotary embedding as x * cos + rotate_half(x) * sin (two products and a sum, as torch
 * rounds them), SiLU as x / (1 + e^-x). The glue runs on the calling thread; the matmuls on
 * the kernels' pool.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "quant_matmul.h"
#include "vector_exp.h"

static void rms_norm(const float *x, int64_t rows, int64_t dim, const float *weight, float eps, float *out) {
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * dim;
    float *o = out + r * dim;
    int64_t i = 0;
    float sum = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= dim; i += 16) {
      const __m512 v = _mm512_loadu_ps(xr + i);
      acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; i < dim; i++) sum += xr[i] * xr[i];
    const float inverse = 1.0f / sqrtf(sum / (float)dim + eps);
    for (i = 0; i < dim; i++) o[i] = weight[i] * (xr[i] * inverse);
  }
}

/* x += y, elementwise */
static void add_into(float *x, const float *y, int64_t count) {
  for (int64_t i = 0; i < count; i++) x[i] += y[i];
}

/* in place on `heads` heads of dim d: x * cos + rotate_half(x) * sin */
static void rope(float *x, int64_t heads, int64_t d, const float *cos, const float *sin) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; h++) {
    float *v = x + h * d;
    float rotated[512];
    for (int64_t i = 0; i < half; i++) {
      rotated[i] = -v[i + half];
      rotated[i + half] = v[i];
    }
    for (int64_t i = 0; i < d; i++) {
      const float a = v[i] * cos[i], b = rotated[i] * sin[i];
      v[i] = a + b;
    }
  }
}

/* out = silu(gate) * up, elementwise */
static void silu_mul(const float *gate, const float *up, int64_t count, float *out) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= count; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(silu, _mm512_loadu_ps(up + i)));
  }
#endif
  for (; i < count; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* Before the attention: qkv = norm(x) @ Wqkv.T (+ bias); q and k rotated; each row's k and
 * v written to the pools at its slot. qkv [rows, (heads + 2 kv_heads) * d], q at its start;
 * normed [rows, hidden] is scratch. cos, sin [rows, d]. */
void parrot_attention_input(const float *x, int64_t rows, int64_t hidden, const float *norm, float eps,
                            const parrot_weight *qkv_weight, const float *bias, int64_t heads, int64_t kv_heads,
                            int64_t d, const float *cos, const float *sin, float *k_pool, float *v_pool,
                            int64_t pool_slots, const int64_t *slots, float *normed, float *qkv, int threads) {
  const int64_t width = (heads + 2 * kv_heads) * d;
  rms_norm(x, rows, hidden, norm, eps, normed);
  parrot_weight_matmul(qkv_weight, normed, rows, qkv, threads);
  for (int64_t r = 0; r < rows; r++) {
    float *row = qkv + r * width;
    if (bias) add_into(row, bias, width);
    rope(row, heads + kv_heads, d, cos + r * d, sin + r * d);
    for (int64_t h = 0; h < kv_heads; h++) {
      memcpy(k_pool + (h * pool_slots + slots[r]) * d, row + (heads + h) * d, sizeof(float) * (size_t)d);
      memcpy(v_pool + (h * pool_slots + slots[r]) * d, row + (heads + kv_heads + h) * d,
             sizeof(float) * (size_t)d);
    }
  }
}

/* After the attention: x += attn @ Wo.T; x += down(silu(gate) * up) with gate, up from
 * norm(x) @ Wgate_up.T. x [rows, hidden] in place; scratch: rows * (hidden + 3 inter). */
void parrot_mlp_block(float *x, int64_t rows, int64_t hidden, int64_t inter, const float *attn,
                      const parrot_weight *o_weight, const float *norm, float eps, const parrot_weight *gate_up,
                      const parrot_weight *down, float *scratch, int threads) {
  float *projected = scratch, *gate_and_up = scratch + rows * hidden, *act = gate_and_up + rows * 2 * inter;
  parrot_weight_matmul(o_weight, attn, rows, projected, threads);
  add_into(x, projected, rows * hidden);
  rms_norm(x, rows, hidden, norm, eps, projected);
  parrot_weight_matmul(gate_up, projected, rows, gate_and_up, threads);
  for (int64_t r = 0; r < rows; r++)
    silu_mul(gate_and_up + r * 2 * inter, gate_and_up + r * 2 * inter + inter, inter, act + r * inter);
  parrot_weight_matmul(down, act, rows, projected, threads);
  add_into(x, projected, rows * hidden);
}
