/* The kernels' thread pool (thread_pool.c). */
#ifndef PARROT_THREAD_POOL_H
#define PARROT_THREAD_POOL_H
#include <stdint.h>

/* the most threads a job is split over (the caller and 63 workers) */
#define PARROT_MAX_THREADS 64

typedef void (*rows_fn)(const void *job, int64_t begin, int64_t end);

/* fn over rows [0, rows) in `threads` parts, the caller taking part 0; a caller that finds
 * the pool busy (another engine in the process) runs the whole job itself */
void parrot_parallel_rows(rows_fn fn, const void *job, int64_t rows, int threads);

/* how long idle workers spin before they sleep */
void parrot_pool_spin(int64_t ns);

#endif
