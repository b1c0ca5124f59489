/* Decode attention on the builtin engine's KV pool, float32: one query token per row.
 *
 * q [B, H, D] (row stride ldq); k_pool, v_pool [KV, S, D] (head-major); out [B, H, D].
 * Row b's keys are a prefix shared by all rows (pool slots prefix[0..P), P may be 0) and
 * then its own: pool slots table[b * ldt + 0 .. lengths[b]), or for a lone row with no
 * table the consecutive slots first .. first + lengths[0]. Keys are read in place.
 *
 * The work comes in units, each a partial softmax (max, sum, weighted values) that a last
 * pass merges by log-sum-exp:
 *   - prefix units (KV head, key range): the G = H/KV query heads of every row in one pass
 *     over the shared keys, the queries in the vector lanes, so a prefix key is read once
 *     for the whole group and scores, softmax and values are plain vector arithmetic
 *     (two-phase attention);
 *   - row units (KV head, row, key range): one row's G query heads over its own keys.
 * A long row's keys are split in two ranges, so two cores share even a lone row's three KV
 * heads. A row's sums run in an order set by its own keys and the thread count, whatever
 * the other rows; only a two-phase group sums its shared keys in an order of its own.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "decode_attention.h"
#include "thread_pool.h"
#include "vector_exp.h"

#define PREFIX_CHUNK 128 /* prefix keys whose scores for all queries are held at once */
#define SPLIT_KEYS 256   /* a row's own keys from this many on are split in two ranges */

typedef struct {
  const float *q, *k_pool, *v_pool;
  int64_t ldq, pool_slots, d, group, rows;
  const int64_t *prefix;
  int64_t prefix_len, prefix_splits;
  const int64_t *table, *lengths;
  int64_t ldt, first, row_splits;
  float scale;
  float *prefix_partial; /* [KV][prefix_splits][rows * G][d + 2] */
  float *row_partial;    /* [KV][rows][row_splits][G][d + 2] */
  float *out;
  int64_t heads;
} attention_job;

/* a per-thread work buffer, grown as needed and kept: the pool's threads live on */
static float *thread_buffer(size_t floats) {
  static __thread float *buffer;
  static __thread size_t capacity;
  if (floats > capacity) {
    free(buffer);
    buffer = malloc(floats * sizeof(float));
    if (buffer == NULL) abort();
    capacity = floats;
  }
  return buffer;
}

static inline void add_scaled(float *acc, float p, const float *v, int64_t d) {
  for (int64_t i = 0; i < d; i++) acc[i] += p * v[i];
}


/* s[i] = e^(s[i] - max) for i < n; returns their sum */
static float exp_less_max(float *s, int64_t n, float max) {
#if defined(__AVX512F__)
  __m512 sum = _mm512_setzero_ps();
  const __m512 m = _mm512_set1_ps(max);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    const __m512 p = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, s + i), m));
    _mm512_mask_storeu_ps(s + i, lanes, p);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(lanes, p));
  }
  return _mm512_reduce_add_ps(sum);
#else
  float sum = 0.0f;
  for (int64_t i = 0; i < n; i++) {
    s[i] = expf(s[i] - max);
    sum += s[i];
  }
  return sum;
#endif
}

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

/* one query over keys [lo, hi) of a slot list (or of first.. when slots is NULL): its
 * partial (max, sum, weighted values) at out */
static void query_partial(const attention_job *j, const float *q, int64_t head, const int64_t *slots,
                          int64_t first, int64_t lo, int64_t hi, float *scores, float *out) {
  const int64_t d = j->d;
  const float *keys = j->k_pool + head * j->pool_slots * d;
  const float *values = j->v_pool + head * j->pool_slots * d;
  float max = -INFINITY;
  for (int64_t i = lo; i < hi; i++) {
    const int64_t slot = slots ? slots[i] : first + i;
    scores[i - lo] = dot(q, keys + slot * d, d) * j->scale;
    if (scores[i - lo] > max) max = scores[i - lo];
  }
  const float sum = hi > lo ? exp_less_max(scores, hi - lo, max) : 0.0f;
  for (int64_t i = 0; i < d; i++) out[2 + i] = 0.0f;
  for (int64_t i = lo; i < hi; i++) {
    const int64_t slot = slots ? slots[i] : first + i;
    add_scaled(out + 2, scores[i - lo], values + slot * d, d);
  }
  out[0] = max;
  out[1] = sum;
}

static inline const float *query(const attention_job *j, int64_t row, int64_t head, int64_t g) {
  return j->q + row * j->ldq + (head * j->group + g) * j->d;
}

#if defined(__AVX512F__)
/* The prefix keys [lo, hi) of one KV head for all rows' queries, 16 queries to a vector.
 * Qt [D][W] holds the queries transposed (W lanes, zero past the last query), S [keys][W]
 * a chunk's scores, then its probabilities; O [D][W] the weighted values; m and l each
 * query's running max and sum, rescaled chunk by chunk (online softmax). */
static void prefix_partial_avx512(const attention_job *j, int64_t head, int64_t lo, int64_t hi,
                                  float *partial) {
  const int64_t d = j->d, nq = j->rows * j->group;
  const int64_t vectors = ((nq + 31) / 32) * 2, w = vectors * 16; /* an even count: pairs below */
  float *qt = thread_buffer((size_t)((2 * d + PREFIX_CHUNK + 2) * w));
  float *o = qt + d * w, *s = o + d * w, *m = s + PREFIX_CHUNK * w, *l = m + w;
  const float *keys = j->k_pool + head * j->pool_slots * d;
  const float *values = j->v_pool + head * j->pool_slots * d;
  memset(qt, 0, sizeof(float) * (size_t)(d * w));
  for (int64_t qi = 0; qi < nq; qi++) {
    const float *src = query(j, qi / j->group, head, qi % j->group);
    for (int64_t i = 0; i < d; i++) qt[i * w + qi] = src[i];
  }
  memset(o, 0, sizeof(float) * (size_t)(d * w));
  for (int64_t i = 0; i < w; i++) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
  }
  const __m512 scale = _mm512_set1_ps(j->scale);
  for (int64_t c0 = lo; c0 < hi; c0 += PREFIX_CHUNK) {
    const int64_t n = hi - c0 < PREFIX_CHUNK ? hi - c0 : PREFIX_CHUNK;
    const int64_t *slots = j->prefix + c0;
    /* scores: two query vectors against four keys at a time */
    for (int64_t v = 0; v < vectors; v += 2) {
      int64_t k = 0;
      for (; k + 4 <= n; k += 4) {
        const float *kr[4] = {keys + slots[k] * d, keys + slots[k + 1] * d, keys + slots[k + 2] * d,
                              keys + slots[k + 3] * d};
        __m512 acc[4][2];
#pragma GCC unroll 4
        for (int t = 0; t < 4; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i++) {
          const __m512 x0 = _mm512_loadu_ps(qt + i * w + v * 16), x1 = _mm512_loadu_ps(qt + i * w + v * 16 + 16);
#pragma GCC unroll 4
          for (int t = 0; t < 4; t++) {
            const __m512 key = _mm512_set1_ps(kr[t][i]);
            acc[t][0] = _mm512_fmadd_ps(x0, key, acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(x1, key, acc[t][1]);
          }
        }
#pragma GCC unroll 4
        for (int t = 0; t < 4; t++) {
          _mm512_storeu_ps(s + (k + t) * w + v * 16, _mm512_mul_ps(acc[t][0], scale));
          _mm512_storeu_ps(s + (k + t) * w + v * 16 + 16, _mm512_mul_ps(acc[t][1], scale));
        }
      }
      for (; k < n; k++) {
        const float *kr = keys + slots[k] * d;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i++) {
          const __m512 key = _mm512_set1_ps(kr[i]);
          a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qt + i * w + v * 16), key, a0);
          a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qt + i * w + v * 16 + 16), key, a1);
        }
        _mm512_storeu_ps(s + k * w + v * 16, _mm512_mul_ps(a0, scale));
        _mm512_storeu_ps(s + k * w + v * 16 + 16, _mm512_mul_ps(a1, scale));
      }
    }
    /* the chunk's max, probabilities and sums; earlier chunks' sums rescaled to the new max */
    for (int64_t v = 0; v < vectors; v++) {
      __m512 chunk_max = _mm512_set1_ps(-INFINITY);
      for (int64_t k = 0; k < n; k++) chunk_max = _mm512_max_ps(chunk_max, _mm512_loadu_ps(s + k * w + v * 16));
      const __m512 old_max = _mm512_loadu_ps(m + v * 16), new_max = _mm512_max_ps(old_max, chunk_max);
      const __m512 rescale = exp512(_mm512_sub_ps(old_max, new_max));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t k = 0; k < n; k++) {
        const __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + k * w + v * 16), new_max));
        _mm512_storeu_ps(s + k * w + v * 16, p);
        sum = _mm512_add_ps(sum, p);
      }
      _mm512_storeu_ps(l + v * 16, _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(l + v * 16), rescale), sum));
      _mm512_storeu_ps(m + v * 16, new_max);
      for (int64_t i = 0; i < d; i++)
        _mm512_storeu_ps(o + i * w + v * 16, _mm512_mul_ps(_mm512_loadu_ps(o + i * w + v * 16), rescale));
    }
    /* weighted values: eight of the head's dims for two query vectors, over the chunk's keys */
    for (int64_t v = 0; v < vectors; v += 2) {
      for (int64_t i0 = 0; i0 < d; i0 += 8) {
        __m512 acc[8][2];
#pragma GCC unroll 8
        for (int t = 0; t < 8; t++) {
          acc[t][0] = _mm512_loadu_ps(o + (i0 + t) * w + v * 16);
          acc[t][1] = _mm512_loadu_ps(o + (i0 + t) * w + v * 16 + 16);
        }
        for (int64_t k = 0; k < n; k++) {
          const float *vr = values + slots[k] * d + i0;
          const __m512 p0 = _mm512_loadu_ps(s + k * w + v * 16), p1 = _mm512_loadu_ps(s + k * w + v * 16 + 16);
#pragma GCC unroll 8
          for (int t = 0; t < 8; t++) {
            const __m512 value = _mm512_set1_ps(vr[t]);
            acc[t][0] = _mm512_fmadd_ps(p0, value, acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(p1, value, acc[t][1]);
          }
        }
#pragma GCC unroll 8
        for (int t = 0; t < 8; t++) {
          _mm512_storeu_ps(o + (i0 + t) * w + v * 16, acc[t][0]);
          _mm512_storeu_ps(o + (i0 + t) * w + v * 16 + 16, acc[t][1]);
        }
      }
    }
  }
  for (int64_t qi = 0; qi < nq; qi++) {
    float *dst = partial + qi * (d + 2);
    dst[0] = m[qi];
    dst[1] = l[qi];
    for (int64_t i = 0; i < d; i++) dst[2 + i] = o[i * w + qi];
  }
}
#endif

static void prefix_units(const void *arg, int64_t begin, int64_t end) {
  const attention_job *j = arg;
  const int64_t d = j->d, nq = j->rows * j->group;
  for (int64_t unit = begin; unit < end; unit++) {
    const int64_t head = unit / j->prefix_splits, part = unit % j->prefix_splits;
    const int64_t lo = j->prefix_len * part / j->prefix_splits;
    const int64_t hi = j->prefix_len * (part + 1) / j->prefix_splits;
    float *partial = j->prefix_partial + unit * nq * (d + 2);
#if defined(__AVX512F__)
    if (d % 8 == 0) {
      prefix_partial_avx512(j, head, lo, hi, partial);
      continue;
    }
#endif
    float *scores = thread_buffer((size_t)(hi - lo > 0 ? hi - lo : 1));
    for (int64_t qi = 0; qi < nq; qi++)
      query_partial(j, query(j, qi / j->group, head, qi % j->group), head, j->prefix, 0, lo, hi, scores,
                    partial + qi * (d + 2));
  }
}

static void row_units(const void *arg, int64_t begin, int64_t end) {
  const attention_job *j = arg;
  const int64_t d = j->d, splits = j->row_splits;
  for (int64_t unit = begin; unit < end; unit++) {
    const int64_t head = unit / (j->rows * splits), row = unit / splits % j->rows, part = unit % splits;
    /* a row's key ranges follow from its own length alone, so its sums never depend on its batch */
    const int64_t length = j->lengths[row], parts = length >= SPLIT_KEYS ? splits : 1;
    const int64_t lo = part < parts ? length * part / parts : 0, hi = part < parts ? length * (part + 1) / parts : 0;
    const int64_t *slots = j->table ? j->table + row * j->ldt : NULL;
    float *scores = thread_buffer((size_t)(hi - lo > 0 ? hi - lo : 1));
    for (int64_t g = 0; g < j->group; g++)
      query_partial(j, query(j, row, head, g), head, slots, j->first, lo, hi, scores,
                    j->row_partial + (unit * j->group + g) * (d + 2));
  }
}

static void merge_rows(const void *arg, int64_t begin, int64_t end) {
  const attention_job *j = arg;
  const int64_t d = j->d, group = j->group, kv_heads = j->heads / group, nq = j->rows * group;
  const float *parts[PARROT_MAX_THREADS + 2]; /* the prefix's ranges, then the row's two */
  for (int64_t row = begin; row < end; row++) {
    for (int64_t head = 0; head < kv_heads; head++) {
      for (int64_t g = 0; g < group; g++) {
        int count = 0;
        for (int64_t part = 0; part < j->prefix_splits; part++)
          parts[count++] = j->prefix_partial + ((head * j->prefix_splits + part) * nq + row * group + g) * (d + 2);
        for (int64_t part = 0; part < j->row_splits; part++)
          parts[count++] = j->row_partial + (((head * j->rows + row) * j->row_splits + part) * group + g) * (d + 2);
        float max = -INFINITY, sum = 0.0f;
        for (int c = 0; c < count; c++)
          if (parts[c][0] > max) max = parts[c][0];
        float *o = j->out + (row * j->heads + head * group + g) * d;
        for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
        for (int c = 0; c < count; c++) {
          const float weight = expf(parts[c][0] - max);
          sum += weight * parts[c][1];
          add_scaled(o, weight, parts[c] + 2, d);
        }
        for (int64_t i = 0; i < d; i++) o[i] /= sum;
      }
    }
  }
}

/* the scratch parrot_decode_attention needs, in floats */
int64_t parrot_decode_attention_scratch(int64_t rows, int64_t heads, int64_t d, int threads) {
  return rows * heads * (d + 2) * ((threads > PARROT_MAX_THREADS ? PARROT_MAX_THREADS : threads) + 2);
}

void parrot_decode_attention(const float *q, int64_t ldq, const float *k_pool, const float *v_pool,
                             int64_t kv_heads, int64_t pool_slots, int64_t d, int64_t heads, int64_t rows,
                             const int64_t *prefix, int64_t prefix_len, const int64_t *table, int64_t ldt,
                             int64_t first, const int64_t *lengths, float scale, float *scratch, float *out,
                             int threads) {
  if (threads > PARROT_MAX_THREADS) threads = PARROT_MAX_THREADS;
  const int64_t group = heads / kv_heads;
  /* key ranges enough for every thread: the prefix's, and a long row's (in two) */
  const int64_t prefix_splits = prefix_len > 0 ? threads : 0;
  const int64_t row_splits = threads > 1 ? 2 : 1;
  attention_job job = {
      .q = q, .k_pool = k_pool, .v_pool = v_pool, .ldq = ldq, .pool_slots = pool_slots, .d = d,
      .group = group, .rows = rows, .prefix = prefix, .prefix_len = prefix_len,
      .prefix_splits = prefix_splits, .table = table, .lengths = lengths, .ldt = ldt, .first = first,
      .row_splits = row_splits, .scale = scale, .out = out, .heads = heads,
      .prefix_partial = scratch,
      .row_partial = scratch + kv_heads * prefix_splits * rows * group * (d + 2)};
  if (prefix_splits) parrot_parallel_rows(prefix_units, &job, kv_heads * prefix_splits, threads);
  parrot_parallel_rows(row_units, &job, kv_heads * rows * row_splits, threads);
  parrot_parallel_rows(merge_rows, &job, rows, threads);
}
