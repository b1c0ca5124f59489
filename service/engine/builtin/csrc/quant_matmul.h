/* The matmuls on 4- and 8-bit weight blocks (quant_matmul.c). */
#ifndef PARROT_QUANT_MATMUL_H
#define PARROT_QUANT_MATMUL_H
#include <stdint.h>

void parrot_q4_matmul(const float *x, int64_t m_rows, int64_t k, int64_t ldx, const uint8_t *codes,
                      const float *d, const float *mins, const float *off, float *out, int64_t n,
                      int64_t ldo, int threads);
void parrot_q8_matmul(const float *x, int64_t m_rows, int64_t k, int64_t ldx, const int8_t *codes,
                      const float *d, float *out, int64_t n, int64_t ldo, int threads);

/* one matrix of blocks: bits 4 (codes, d, m, off as parrot_q4_matmul takes them) or 8
 * (codes, d; m and off unused), n output rows of k inputs */
typedef struct {
  int64_t bits, n, k;
  const void *codes;
  const float *d, *m, *off;
} parrot_weight;

/* out [rows, n] = x [rows, k] @ w.T */
void parrot_weight_matmul(const parrot_weight *w, const float *x, int64_t rows, float *out, int threads);

#endif
