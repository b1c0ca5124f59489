/* The work of a llama decoder layer around its attention, on 4/8-bit weight blocks: one call
 * before the attention, one after, instead of a dozen small torch ops, whose dispatch costs
 * more than their arithmetic when a step has a few rows.
 *
 * The arithmetic is the model's: RMS norm as x * (1 / sqrt(mean(x^2) + eps)) * weight, the
 * rotary embedding as x * cos + rotate_half(x) * sin (two products and a sum, as torch
 * rounds them), SiLU as x / (1 + e^-x). The glue is split by rows, the matmuls by output
 * features, over the kernels' pool. parrot_decoder_layers runs a step's whole stack of layers,
 * its attention included, in one call.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "decode_attention.h"
#include "quant_matmul.h"
#include "thread_pool.h"
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

/* The per-row glue, split over the pool's threads by rows (each row's arithmetic is the same
 * whatever the split, so a row's result never depends on its batch). */
typedef struct {
  float *x, *out, *qkv;
  const float *y, *norm, *bias, *cos, *sin;
  float eps;
  int64_t dim, inter, heads, kv_heads, d, pool_slots;
  float *k_pool, *v_pool;
  const int64_t *slots;
} glue_job;

static void norm_rows(const void *arg, int64_t begin, int64_t end) {
  const glue_job *j = arg;
  rms_norm(j->x + begin * j->dim, end - begin, j->dim, j->norm, j->eps, j->out + begin * j->dim);
}

/* x += y, then out = norm(x) (with y NULL: only the norm) */
static void add_norm_rows(const void *arg, int64_t begin, int64_t end) {
  const glue_job *j = arg;
  if (j->y) add_into(j->x + begin * j->dim, j->y + begin * j->dim, (end - begin) * j->dim);
  if (j->out) rms_norm(j->x + begin * j->dim, end - begin, j->dim, j->norm, j->eps, j->out + begin * j->dim);
}

static void rope_store_rows(const void *arg, int64_t begin, int64_t end) {
  const glue_job *j = arg;
  const int64_t d = j->d, width = (j->heads + 2 * j->kv_heads) * d;
  for (int64_t r = begin; r < end; r++) {
    float *row = j->qkv + r * width;
    if (j->bias) add_into(row, j->bias, width);
    rope(row, j->heads + j->kv_heads, d, j->cos + r * d, j->sin + r * d);
    for (int64_t h = 0; h < j->kv_heads; h++) {
      memcpy(j->k_pool + (h * j->pool_slots + j->slots[r]) * d, row + (j->heads + h) * d, sizeof(float) * (size_t)d);
      memcpy(j->v_pool + (h * j->pool_slots + j->slots[r]) * d, row + (j->heads + j->kv_heads + h) * d,
             sizeof(float) * (size_t)d);
    }
  }
}

static void silu_mul_rows(const void *arg, int64_t begin, int64_t end) {
  const glue_job *j = arg;
  for (int64_t r = begin; r < end; r++)
    silu_mul(j->y + r * 2 * j->inter, j->y + r * 2 * j->inter + j->inter, j->inter, j->out + r * j->inter);
}

/* Before the attention: qkv = norm(x) @ Wqkv.T (+ bias); q and k rotated; each row's k and
 * v written to the pools at its slot. qkv [rows, (heads + 2 kv_heads) * d], q at its start;
 * normed [rows, hidden] is scratch. cos, sin [rows, d]. */
void parrot_attention_input(float *x, int64_t rows, int64_t hidden, const float *norm, float eps,
                            const parrot_weight *qkv_weight, const float *bias, int64_t heads, int64_t kv_heads,
                            int64_t d, const float *cos, const float *sin, float *k_pool, float *v_pool,
                            int64_t pool_slots, const int64_t *slots, float *normed, float *qkv, int threads) {
  glue_job job = {.x = x, .out = normed, .qkv = qkv, .norm = norm, .bias = bias, .cos = cos, .sin = sin,
                  .eps = eps, .dim = hidden, .heads = heads, .kv_heads = kv_heads, .d = d,
                  .pool_slots = pool_slots, .k_pool = k_pool, .v_pool = v_pool, .slots = slots};
  parrot_parallel_rows(norm_rows, &job, rows, threads);
  parrot_weight_matmul(qkv_weight, normed, rows, qkv, threads);
  parrot_parallel_rows(rope_store_rows, &job, rows, threads);
}

/* After the attention: x += attn @ Wo.T; x += down(silu(gate) * up) with gate, up from
 * norm(x) @ Wgate_up.T. x [rows, hidden] in place; scratch: rows * (2 hidden + 3 inter). */
void parrot_mlp_block(float *x, int64_t rows, int64_t hidden, int64_t inter, const float *attn,
                      const parrot_weight *o_weight, const float *norm, float eps, const parrot_weight *gate_up,
                      const parrot_weight *down, float *scratch, int threads) {
  float *projected = scratch, *gate_and_up = scratch + rows * hidden, *act = gate_and_up + rows * 2 * inter;
  float *normed = act + rows * inter;
  glue_job add_norm = {.x = x, .y = projected, .out = normed, .norm = norm, .eps = eps, .dim = hidden};
  glue_job activation = {.y = gate_and_up, .out = act, .inter = inter};
  glue_job add = {.x = x, .y = projected, .dim = hidden};
  parrot_weight_matmul(o_weight, attn, rows, projected, threads);
  parrot_parallel_rows(add_norm_rows, &add_norm, rows, threads);
  parrot_weight_matmul(gate_up, normed, rows, gate_and_up, threads);
  parrot_parallel_rows(silu_mul_rows, &activation, rows, threads);
  parrot_weight_matmul(down, act, rows, projected, threads);
  parrot_parallel_rows(add_norm_rows, &add, rows, threads);
}

/* ---- the whole stack of layers in one call ---------------------------------------------- */

/* one layer's weights (qkv_bias may be NULL) and KV pools */
typedef struct {
  const float *input_norm, *post_norm, *qkv_bias;
  const parrot_weight *qkv, *o, *gate_up, *down;
  float *k_pool, *v_pool;
} parrot_layer;

/* the attention of the step's rows [row, row + rows), as parrot_decode_attention takes it */
typedef struct {
  int64_t row, rows;
  const int64_t *prefix;
  int64_t prefix_len;
  const int64_t *table;
  int64_t ldt, first;
  const int64_t *lengths;
  float *scratch;
} parrot_attention_plan;

/* Every layer of a step: its attention input, the attention of each plan (the plans cover the
 * rows, in order), its MLP block. One call instead of three a layer and one a plan, so a
 * decode step pays the interpreter (and hands the GIL over) once, not a hundred times.
 * qkv [rows, (heads + 2 kv_heads) * d], normed [rows, hidden], attn [rows, heads * d] and
 * scratch (parrot_mlp_block's) are scratch. */
void parrot_decoder_layers(float *x, int64_t rows, int64_t hidden, int64_t inter, const parrot_layer *layers,
                           int64_t num_layers, float eps, int64_t heads, int64_t kv_heads, int64_t d,
                           const float *cos, const float *sin, int64_t pool_slots, const int64_t *slots,
                           const parrot_attention_plan *plans, int64_t num_plans, float scale, float *normed,
                           float *qkv, float *attn, float *scratch, int threads) {
  const int64_t ldq = (heads + 2 * kv_heads) * d;
  for (int64_t i = 0; i < num_layers; i++) {
    const parrot_layer *layer = &layers[i];
    parrot_attention_input(x, rows, hidden, layer->input_norm, eps, layer->qkv, layer->qkv_bias, heads, kv_heads,
                           d, cos, sin, layer->k_pool, layer->v_pool, pool_slots, slots, normed, qkv, threads);
    for (int64_t p = 0; p < num_plans; p++) {
      const parrot_attention_plan *plan = &plans[p];
      parrot_decode_attention(qkv + plan->row * ldq, ldq, layer->k_pool, layer->v_pool, kv_heads, pool_slots, d,
                              heads, plan->rows, plan->prefix, plan->prefix_len, plan->table, plan->ldt,
                              plan->first, plan->lengths, scale, plan->scratch, attn + plan->row * heads * d,
                              threads);
    }
    parrot_mlp_block(x, rows, hidden, inter, attn, layer->o, layer->post_norm, eps, layer->gate_up, layer->down,
                     scratch, threads);
  }
}
