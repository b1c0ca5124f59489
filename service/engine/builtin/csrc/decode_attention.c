/* Decode attention for one query token, on the builtin engine's KV pool, float32.
 *
 * q [H, D]; k_pool, v_pool [KV, S, D] (head-major); the request's keys are pool slots
 * slots[0..L) (or the consecutive slots first..first+L when slots is NULL); out [H, D].
 * The G = H/KV query heads of a KV head read its keys once. Work is split into units of
 * (KV head, key range), each computing its partial softmax (max, sum, weighted values),
 * merged by the caller's thread: split-K, so two cores share even three KV heads.
 * Scores use the exact exp of libm; sums are float32 in a fixed order for a given L and
 * thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "thread_pool.h"

typedef struct {
  const float *q, *k_pool, *v_pool;
  int64_t pool_slots, d, group, length, first, splits;
  const int64_t *slots;
  float scale;
  float *partial; /* per unit: group x (max, sum, d values) */
} attention_job;

static inline float dot(const float *a, const float *b, int64_t d) {
#if defined(__AVX512F__)
  if (d % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float acc = 0.0f;
  for (int64_t i = 0; i < d; i++) acc += a[i] * b[i];
  return acc;
}

static inline void add_scaled(float *acc, float p, const float *v, int64_t d) {
  for (int64_t i = 0; i < d; i++) acc[i] += p * v[i];
}

static void attention_units(const void *arg, int64_t begin, int64_t end) {
  const attention_job *j = arg;
  const int64_t d = j->d, g_count = j->group;
  for (int64_t unit = begin; unit < end; unit++) {
    const int64_t head = unit / j->splits, part = unit % j->splits;
    const int64_t lo = j->length * part / j->splits, hi = j->length * (part + 1) / j->splits;
    const float *keys = j->k_pool + head * j->pool_slots * d;
    const float *values = j->v_pool + head * j->pool_slots * d;
    float *partial = j->partial + unit * g_count * (d + 2);
    float *scores = malloc(sizeof(float) * (size_t)(hi - lo > 0 ? hi - lo : 1) * (size_t)g_count);
    for (int64_t g = 0; g < g_count; g++) {
      const float *q = j->q + (head * g_count + g) * d;
      float *s = scores + g * (hi - lo), *out = partial + g * (d + 2);
      float max = -INFINITY, sum = 0.0f;
      for (int64_t i = lo; i < hi; i++) {
        const int64_t slot = j->slots ? j->slots[i] : j->first + i;
        s[i - lo] = dot(q, keys + slot * d, d) * j->scale;
        if (s[i - lo] > max) max = s[i - lo];
      }
      for (int64_t i = 0; i < d; i++) out[2 + i] = 0.0f;
      for (int64_t i = lo; i < hi; i++) {
        const int64_t slot = j->slots ? j->slots[i] : j->first + i;
        const float p = expf(s[i - lo] - max);
        sum += p;
        add_scaled(out + 2, p, values + slot * d, d);
      }
      out[0] = max;
      out[1] = sum;
    }
    free(scores);
  }
}

/* scratch: at least kv_heads * splits * group * (d + 2) floats, splits = 2 (see below) */
void parrot_decode_attention(const float *q, const float *k_pool, const float *v_pool, int64_t kv_heads,
                             int64_t pool_slots, int64_t d, int64_t heads, const int64_t *slots,
                             int64_t first, int64_t length, float scale, float *scratch, float *out,
                             int threads) {
  const int64_t group = heads / kv_heads;
  /* split each head's keys in two once they are many: units enough for two threads */
  const int64_t splits = threads > 1 && length >= 256 ? 2 : 1;
  attention_job job = {q, k_pool, v_pool, pool_slots, d, group, length, first, splits, slots, scale,
                       scratch};
  parrot_parallel_rows(attention_units, &job, kv_heads * splits, threads);
  for (int64_t head = 0; head < kv_heads; head++) {
    for (int64_t g = 0; g < group; g++) {
      float max = -INFINITY, sum = 0.0f;
      for (int64_t part = 0; part < splits; part++) {
        const float *p = scratch + ((head * splits + part) * group + g) * (d + 2);
        if (p[0] > max) max = p[0];
      }
      float *o = out + (head * group + g) * d;
      for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
      for (int64_t part = 0; part < splits; part++) {
        const float *p = scratch + ((head * splits + part) * group + g) * (d + 2);
        const float w = expf(p[0] - max);
        sum += w * p[1];
        add_scaled(o, w, p + 2, d);
      }
      for (int64_t i = 0; i < d; i++) o[i] /= sum;
    }
  }
}
