/* A small thread pool for the builtin engine's C kernels.
 *
 * Not OpenMP: the engine calls from its own thread, and libgomp, seeing more threads than
 * cores (the interpreter's main thread counts), stops spinning and puts its workers to
 * sleep after every parallel region, so each matmul of a decode step would wait for a
 * wake-up. These workers spin a while between calls (while the caller says torch's own
 * ops run on one thread) and sleep when the engine goes idle.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#include "thread_pool.h"

#define MAX_WORKERS (PARROT_MAX_THREADS - 1)

/* How long an idle worker spins before it sleeps: long enough to bridge the gaps between
 * the matmuls of a decode step, but only while torch's own ops run on one thread (the
 * caller says so); otherwise torch's OpenMP workers need those cores between our calls. */
static atomic_llong pool_spin_ns;


static pthread_mutex_t pool_busy = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */
static pthread_mutex_t pool_sleep = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;
static int pool_workers; /* started so far */
static atomic_uint pool_generation;
static atomic_int pool_pending;
static struct {
  rows_fn fn;
  const void *job;
  int64_t rows;
  int parts;
} pool_task;

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

static void run_part(int part) {
  int64_t rows = pool_task.rows, parts = pool_task.parts;
  pool_task.fn(pool_task.job, rows * part / parts, rows * (part + 1) / parts);
}

static void *worker_main(void *arg) {
  /* the part this worker takes (part 0 is the caller's), and the last job it has seen: the
   * one before the job it was started for */
  const int index = (int)((uintptr_t)arg >> 32);
  unsigned seen = (unsigned)(uintptr_t)arg;
  for (;;) {
    int64_t spin_start = now_ns();
    unsigned spins = 0;
    while (atomic_load_explicit(&pool_generation, memory_order_acquire) == seen) {
      cpu_relax();
      const int64_t spin_ns = atomic_load_explicit(&pool_spin_ns, memory_order_relaxed);
      if (++spins % 256 == 0 && now_ns() - spin_start > spin_ns) {
        pthread_mutex_lock(&pool_sleep);
        while (atomic_load(&pool_generation) == seen) pthread_cond_wait(&pool_wake, &pool_sleep);
        pthread_mutex_unlock(&pool_sleep);
      }
    }
    seen = atomic_load(&pool_generation);
    if (index < pool_task.parts) run_part(index);
    atomic_fetch_sub_explicit(&pool_pending, 1, memory_order_release);
  }
  return NULL;
}

static void reset_after_fork(void) { /* a forked child has none of its parent's threads */
  pool_workers = 0;
  pthread_mutex_init(&pool_busy, NULL);
  pthread_mutex_init(&pool_sleep, NULL);
  pthread_cond_init(&pool_wake, NULL);
}

static void start_workers(int wanted) {
  static int fork_handler;
  if (!fork_handler) {
    pthread_atfork(NULL, NULL, reset_after_fork);
    fork_handler = 1;
  }
  while (pool_workers < wanted) {
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    uintptr_t arg = ((uintptr_t)(pool_workers + 1) << 32) | atomic_load(&pool_generation);
    int failed = pthread_create(&thread, &attr, worker_main, (void *)arg);
    pthread_attr_destroy(&attr);
    if (failed) break;
    pool_workers++;
  }
}

/* fn over rows [0, rows) in `threads` parts, the caller taking part 0. A caller that finds
 * the pool busy (another engine in the process) runs the whole job itself. */
void parrot_parallel_rows(rows_fn fn, const void *job, int64_t rows, int threads) {
  if (threads > MAX_WORKERS + 1) threads = MAX_WORKERS + 1;
  if (threads <= 1 || rows < 2 * threads || pthread_mutex_trylock(&pool_busy) != 0) {
    fn(job, 0, rows);
    return;
  }
  start_workers(threads - 1);
  int parts = pool_workers + 1 < threads ? pool_workers + 1 : threads;
  pool_task.fn = fn;
  pool_task.job = job;
  pool_task.rows = rows;
  pool_task.parts = parts;
  atomic_store(&pool_pending, pool_workers);
  pthread_mutex_lock(&pool_sleep); /* so that no worker misses the wake-up between check and wait */
  atomic_fetch_add_explicit(&pool_generation, 1, memory_order_release);
  pthread_cond_broadcast(&pool_wake);
  pthread_mutex_unlock(&pool_sleep);
  run_part(0);
  while (atomic_load_explicit(&pool_pending, memory_order_acquire) > 0) cpu_relax();
  pthread_mutex_unlock(&pool_busy);
}

void parrot_pool_spin(int64_t ns) { atomic_store(&pool_spin_ns, ns); }
