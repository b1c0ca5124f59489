/* Decode attention on the KV pool (decode_attention.c). */
#ifndef PARROT_DECODE_ATTENTION_H
#define PARROT_DECODE_ATTENTION_H
#include <stdint.h>

/* floats of scratch a call over `rows` rows needs */
int64_t parrot_decode_attention_scratch(int64_t rows, int64_t heads, int64_t d, int threads);

/* q [rows, heads, d] (row stride ldq) attends to its keys in the pools: the shared prefix
 * slots, then each row's own (table, or a lone row's consecutive slots from first); out
 * [rows, heads, d] */
void parrot_decode_attention(const float *q, int64_t ldq, const float *k_pool, const float *v_pool,
                             int64_t kv_heads, int64_t pool_slots, int64_t d, int64_t heads, int64_t rows,
                             const int64_t *prefix, int64_t prefix_len, const int64_t *table, int64_t ldt,
                             int64_t first, const int64_t *lengths, float scale, float *scratch, float *out,
                             int threads);

#endif
