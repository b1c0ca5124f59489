/* Matmuls on 4- and 8-bit weight blocks with float32 activations, for the builtin engine.
 *
 * A block is 32 weights of one output row. Q4: 16 bytes of codes (byte j holds weight j in
 * its low nibble and weight j + 16 in its high one, as GGUF lays them out) with a float32
 * scale d and minimum m per block; a weight is (q + off) * d + m, computed as that product
 * and that sum (two roundings), which is how gguf-py (and so transformers) de-quantizes
 * Q4_0 (off = -8, m = 0) and Q4_1 (off = 0). Q8: 32 signed bytes and a scale, q * d.
 *
 * So a weight has exactly the float32 value the de-quantized model holds, and it meets a
 * float32 activation in a float32 fused multiply-add: the result differs from a float32
 * matmul on the de-quantized weights only in the order of the sums.
 *
 * out[i, n] = sum_k x[i, k] * w[n, k], rows n split over the threads. Built at first use
 * with the machine's own instruction set (-march=native); the AVX-512 paths look up a
 * block's 16 possible values in one register instead of converting every code.
 *
 * Rows are split over thread_pool.c's workers.
 */
#include <stdint.h>
#include <string.h>

#include "quant_matmul.h"
#include "thread_pool.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define BLOCK 32
#define ROWS_AT_ONCE 4    /* activation rows sharing one pass over a weight row's blocks */
#define L1_ROWS_BYTES (24 * 1024) /* activation rows kept in L1 while the weights stream past */

/* ---- one output row, any number of activation rows, portable C ----------------------- */
static inline void q4_row_c(const float *x, int64_t m_rows, int64_t k, int64_t ldx, const uint8_t *codes,
                            const float *d, const float *mins, float off, float *out, int64_t ldo) {
  for (int64_t i = 0; i < m_rows; i++) {
    const float *xi = x + i * ldx;
    float acc = 0.0f;
    for (int64_t g = 0; g < k / BLOCK; g++) {
      const uint8_t *q = codes + g * 16;
      float lut[16];
      for (int v = 0; v < 16; v++) {
        float scaled = ((float)v + off) * d[g];
        lut[v] = scaled + mins[g];
      }
      for (int j = 0; j < 16; j++) {
        acc += lut[q[j] & 0x0F] * xi[g * BLOCK + j];
        acc += lut[q[j] >> 4] * xi[g * BLOCK + j + 16];
      }
    }
    out[i * ldo] = acc;
  }
}

static inline void q8_row_c(const float *x, int64_t m_rows, int64_t k, int64_t ldx, const int8_t *codes,
                     const float *d, float *out, int64_t ldo) {
  for (int64_t i = 0; i < m_rows; i++) {
    const float *xi = x + i * ldx;
    float acc = 0.0f;
    for (int64_t j = 0; j < k; j++) {
      float w = (float)codes[j] * d[j / BLOCK];
      acc += w * xi[j];
    }
    out[i * ldo] = acc;
  }
}

#if defined(__AVX512F__)
static inline __m512 q4_lut(__m512 iota_off, float d, float m) {
  /* not an FMA: the product and the sum round separately, as the de-quantizer's do */
  return _mm512_add_ps(_mm512_mul_ps(iota_off, _mm512_set1_ps(d)), _mm512_set1_ps(m));
}

static inline void q4_unpack(const uint8_t *q, __m512 lut, __m512 *lo, __m512 *hi) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  __m128i bytes = _mm_loadu_si128((const __m128i *)q);
  __m128i low = _mm_and_si128(bytes, mask);
  __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  *lo = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(low), lut);
  *hi = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(high), lut);
}

/* `rows` activation rows (a constant where inlined) against one weight row. Four sums per
 * activation row, over even and odd blocks' low and high halves, keep the FMA units busy;
 * every row is summed in this same order whatever the batch, so a request's output never
 * depends on what it was batched with. */
static inline __attribute__((always_inline)) void q4_rows_avx512(
    const float *x, const int rows, int64_t k, int64_t ldx, const uint8_t *codes, const float *d,
    const float *mins, __m512 iota_off, float *out, int64_t ldo) {
  const int64_t blocks = k / BLOCK;
  __m512 acc[ROWS_AT_ONCE][4];
  for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 1 < blocks; g += 2) {
    __m512 w0, w1, w2, w3;
    q4_unpack(codes + g * 16, q4_lut(iota_off, d[g], mins[g]), &w0, &w1);
    q4_unpack(codes + (g + 1) * 16, q4_lut(iota_off, d[g + 1], mins[g + 1]), &w2, &w3);
    for (int r = 0; r < rows; r++) {
      const float *xg = x + r * ldx + g * BLOCK;
      acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xg), acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xg + 16), acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xg + 32), acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xg + 48), acc[r][3]);
    }
  }
  if (g < blocks) {
    __m512 w0, w1;
    q4_unpack(codes + g * 16, q4_lut(iota_off, d[g], mins[g]), &w0, &w1);
    for (int r = 0; r < rows; r++) {
      const float *xg = x + r * ldx + g * BLOCK;
      acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xg), acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xg + 16), acc[r][1]);
    }
  }
  for (int r = 0; r < rows; r++)
    out[r * ldo] = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3])));
}

/* q4_rows_avx512 for one row, written out: the same sums in the same order, in registers */
static inline void q4_one_row_avx512(const float *x, int64_t k, const uint8_t *codes, const float *d,
                                     const float *mins, __m512 iota_off, float *out) {
  const int64_t blocks = k / BLOCK;
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 1 < blocks; g += 2) {
    __m512 w0, w1, w2, w3;
    q4_unpack(codes + g * 16, q4_lut(iota_off, d[g], mins[g]), &w0, &w1);
    q4_unpack(codes + (g + 1) * 16, q4_lut(iota_off, d[g + 1], mins[g + 1]), &w2, &w3);
    const float *xg = x + g * BLOCK;
    a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xg), a0);
    a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xg + 16), a1);
    a2 = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xg + 32), a2);
    a3 = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xg + 48), a3);
  }
  if (g < blocks) {
    __m512 w0, w1;
    q4_unpack(codes + g * 16, q4_lut(iota_off, d[g], mins[g]), &w0, &w1);
    a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + g * BLOCK), a0);
    a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + g * BLOCK + 16), a1);
  }
  *out = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

static void q4_row_avx512(const float *x, int64_t m_rows, int64_t k, int64_t ldx,
                          const uint8_t *codes, const float *d, const float *mins, float off,
                          float *out, int64_t ldo) {
  const __m512 iota_off = _mm512_add_ps(
      _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_ps(off));
  if (m_rows == 1) { /* a batch-1 decode step */
    q4_one_row_avx512(x, k, codes, d, mins, iota_off, out);
    return;
  }
  for (int64_t i = 0; i < m_rows; i += ROWS_AT_ONCE) {
    const float *xi = x + i * ldx;
    float *oi = out + i * ldo;
    switch (m_rows - i < ROWS_AT_ONCE ? m_rows - i : ROWS_AT_ONCE) {
      case 1: q4_one_row_avx512(xi, k, codes, d, mins, iota_off, oi); break;
      case 2: q4_rows_avx512(xi, 2, k, ldx, codes, d, mins, iota_off, oi, ldo); break;
      case 3: q4_rows_avx512(xi, 3, k, ldx, codes, d, mins, iota_off, oi, ldo); break;
      default: q4_rows_avx512(xi, 4, k, ldx, codes, d, mins, iota_off, oi, ldo); break;
    }
  }
}

static inline void q8_unpack(const int8_t *q, float d, __m512 *lo, __m512 *hi) {
  const __m512 scale = _mm512_set1_ps(d);
  __m128i low = _mm_loadu_si128((const __m128i *)q);
  __m128i high = _mm_loadu_si128((const __m128i *)(q + 16));
  *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(low)), scale);
  *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(high)), scale);
}

static void q8_row_avx512(const float *x, int64_t m_rows, int64_t k, int64_t ldx, const int8_t *codes,
                          const float *d, float *out, int64_t ldo) {
  const int64_t blocks = k / BLOCK;
  for (int64_t i0 = 0; i0 < m_rows; i0 += ROWS_AT_ONCE) {
    const int64_t rows = m_rows - i0 < ROWS_AT_ONCE ? m_rows - i0 : ROWS_AT_ONCE;
    __m512 lo[ROWS_AT_ONCE], hi[ROWS_AT_ONCE];
    for (int r = 0; r < ROWS_AT_ONCE; r++) lo[r] = hi[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < blocks; g++) {
      __m512 w0, w1;
      q8_unpack(codes + g * BLOCK, d[g], &w0, &w1);
      for (int r = 0; r < rows; r++) {
        const float *xg = x + (i0 + r) * ldx + g * BLOCK;
        lo[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xg), lo[r]);
        hi[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xg + 16), hi[r]);
      }
    }
    for (int r = 0; r < rows; r++) out[(i0 + r) * ldo] = _mm512_reduce_add_ps(_mm512_add_ps(lo[r], hi[r]));
  }
}
#endif

/* ---- entry points --------------------------------------------------------------------- */
int parrot_quant_simd(void) {
#if defined(__AVX512F__)
  return 512;
#else
  return 0;
#endif
}

typedef struct matmul_job matmul_job;
/* one weight row against `rows` activation rows from x, results at out[i * ldo] */
typedef void (*row_fn)(const matmul_job *j, const float *x, int64_t rows, int64_t row, float *out);

struct matmul_job {
  const float *x;
  int64_t m_rows, k, ldx;
  const void *codes;
  const float *d, *mins, *off;
  float *out;
  int64_t ldo;
  row_fn row;
};

static void q4_row(const matmul_job *j, const float *x, int64_t rows, int64_t row, float *out) {
  const int64_t blocks = j->k / BLOCK;
  const uint8_t *codes = (const uint8_t *)j->codes + row * blocks * 16;
#if defined(__AVX512F__)
  q4_row_avx512(x, rows, j->k, j->ldx, codes, j->d + row * blocks, j->mins + row * blocks, j->off[row], out,
                j->ldo);
#else
  q4_row_c(x, rows, j->k, j->ldx, codes, j->d + row * blocks, j->mins + row * blocks, j->off[row], out,
           j->ldo);
#endif
}

static void q8_row(const matmul_job *j, const float *x, int64_t rows, int64_t row, float *out) {
  const int64_t blocks = j->k / BLOCK;
  const int8_t *codes = (const int8_t *)j->codes + row * j->k;
#if defined(__AVX512F__)
  q8_row_avx512(x, rows, j->k, j->ldx, codes, j->d + row * blocks, out, j->ldo);
#else
  q8_row_c(x, rows, j->k, j->ldx, codes, j->d + row * blocks, out, j->ldo);
#endif
}

static int64_t chunk_rows(int64_t k) {
  int64_t rows = L1_ROWS_BYTES / (k * (int64_t)sizeof(float));
  rows -= rows % ROWS_AT_ONCE;
  return rows < ROWS_AT_ONCE ? ROWS_AT_ONCE : rows;
}

/* weight rows [begin, end): a chunk of activation rows stays in L1 while this thread's
 * weight rows (in L2) pass, chunk after chunk */
static void matmul_rows(const void *arg, int64_t begin, int64_t end) {
  const matmul_job *j = arg;
  const int64_t chunk = chunk_rows(j->k);
  for (int64_t i = 0; i < j->m_rows; i += chunk) {
    const int64_t rows = j->m_rows - i < chunk ? j->m_rows - i : chunk;
    for (int64_t row = begin; row < end; row++)
      j->row(j, j->x + i * j->ldx, rows, row, j->out + i * j->ldo + row);
  }
}

/* x [m_rows, k] (row stride ldx); codes [n, k/32, 16]; d, mins [n, k/32]; off [n];
 * out [m_rows, n] (row stride ldo) */
void parrot_q4_matmul(const float *x, int64_t m_rows, int64_t k, int64_t ldx, const uint8_t *codes,
                      const float *d, const float *mins, const float *off, float *out, int64_t n,
                      int64_t ldo, int threads) {
  matmul_job job = {x, m_rows, k, ldx, codes, d, mins, off, out, ldo, q4_row};
  parrot_parallel_rows(matmul_rows, &job, n, threads);
}

/* codes [n, k] int8; d [n, k/32] */
void parrot_q8_matmul(const float *x, int64_t m_rows, int64_t k, int64_t ldx, const int8_t *codes,
                      const float *d, float *out, int64_t n, int64_t ldo, int threads) {
  matmul_job job = {x, m_rows, k, ldx, codes, d, NULL, NULL, out, ldo, q8_row};
  parrot_parallel_rows(matmul_rows, &job, n, threads);
}

void parrot_weight_matmul(const parrot_weight *w, const float *x, int64_t rows, float *out, int threads) {
  if (w->bits == 4)
    parrot_q4_matmul(x, rows, w->k, w->k, w->codes, w->d, w->m, w->off, out, w->n, w->n, threads);
  else
    parrot_q8_matmul(x, rows, w->k, w->k, w->codes, w->d, out, w->n, w->n, threads);
}
