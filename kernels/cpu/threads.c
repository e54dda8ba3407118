/* threads.c: a persistent pool of worker threads. Decode calls dozens of small
 * ops per token, so threads are started once per context, not per op, and an
 * idle worker spins a while before it sleeps: waking a sleeping thread costs
 * tens of microseconds, as much as a whole small GEMV (as OpenMP and
 * llama.cpp do, idle workers burn CPU for a moment to answer at once). The
 * calling thread does worker 0's share itself. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "cpu.h"

/* Polls before sleeping: a few milliseconds, longer than the gaps between the
 * ops of a decode step (20000 polls gave 425 tokens/s on gsmwiki-28m, 100000
 * gave 558: the gaps around sampling outlast the shorter spin). */
#define SPINS 100000

struct iq_pool {
  int threads;
  pthread_t *workers;
  pthread_mutex_t lock; /* guards sleeping on the two conditions */
  pthread_cond_t start, done;
  atomic_uint_fast64_t generation; /* bumped per job; workers wait for a new one */
  atomic_int pending;              /* workers not yet finished with this job */
  atomic_int stopping;
  /* the current job, written before generation is bumped */
  iq_range_fn fn;
  void *arg;
  int64_t count;
  int parts;
};

typedef struct {
  iq_pool *pool;
  int index;
} worker_arg;

static inline void pause_cpu(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

static void run_part(iq_pool *pool, int part) {
  int64_t begin = pool->count * part / pool->parts;
  int64_t end = pool->count * (part + 1) / pool->parts;
  if (begin < end) pool->fn(pool->arg, begin, end, part);
}

/* The next generation after `seen`, or `seen` when the pool is stopping. */
static uint64_t wait_for_job(iq_pool *pool, uint64_t seen) {
  for (int i = 0; i < SPINS; i++) {
    uint64_t g = atomic_load_explicit(&pool->generation, memory_order_acquire);
    if (g != seen || atomic_load(&pool->stopping)) return g;
    pause_cpu();
  }
  pthread_mutex_lock(&pool->lock);
  uint64_t g;
  while ((g = atomic_load(&pool->generation)) == seen && !atomic_load(&pool->stopping))
    pthread_cond_wait(&pool->start, &pool->lock);
  pthread_mutex_unlock(&pool->lock);
  return g;
}

static void *worker_main(void *p) {
  worker_arg self = *(worker_arg *)p;
  free(p);
  iq_pool *pool = self.pool;
  uint64_t seen = 0;
  for (;;) {
    seen = wait_for_job(pool, seen);
    if (atomic_load(&pool->stopping)) break;
    if (self.index < pool->parts) run_part(pool, self.index);
    if (atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_acq_rel) == 1) {
      pthread_mutex_lock(&pool->lock);
      pthread_cond_signal(&pool->done);
      pthread_mutex_unlock(&pool->lock);
    }
  }
  return NULL;
}

iq_pool *iq_pool_create(int threads) {
  iq_pool *pool = calloc(1, sizeof *pool);
  if (!pool) return NULL;
  pool->threads = threads;
  atomic_init(&pool->generation, 0);
  atomic_init(&pool->pending, 0);
  atomic_init(&pool->stopping, 0);
  pthread_mutex_init(&pool->lock, NULL);
  pthread_cond_init(&pool->start, NULL);
  pthread_cond_init(&pool->done, NULL);
  pool->workers = calloc((size_t)threads, sizeof *pool->workers);
  if (!pool->workers) {
    free(pool);
    return NULL;
  }
  for (int i = 1; i < threads; i++) {
    worker_arg *arg = malloc(sizeof *arg);
    if (arg) *arg = (worker_arg){pool, i};
    if (!arg || pthread_create(&pool->workers[i], NULL, worker_main, arg) != 0) {
      free(arg);
      pool->threads = i; /* join only those started */
      iq_pool_destroy(pool);
      return NULL;
    }
  }
  return pool;
}

void iq_pool_destroy(iq_pool *pool) {
  if (!pool) return;
  pthread_mutex_lock(&pool->lock);
  atomic_store(&pool->stopping, 1);
  pthread_cond_broadcast(&pool->start);
  pthread_mutex_unlock(&pool->lock);
  for (int i = 1; i < pool->threads; i++) pthread_join(pool->workers[i], NULL);
  pthread_mutex_destroy(&pool->lock);
  pthread_cond_destroy(&pool->start);
  pthread_cond_destroy(&pool->done);
  free(pool->workers);
  free(pool);
}

void iq_parallel_for(iq_ctx *ctx, int64_t count, int64_t min_chunk, iq_range_fn fn, void *arg) {
  iq_pool *pool = ctx->pool;
  if (count <= 0) return;
  if (min_chunk < 1) min_chunk = 1;
  int64_t by_size = count / min_chunk;
  int parts = by_size < pool->threads ? (int)(by_size > 0 ? by_size : 1) : pool->threads;
  if (parts == 1) {
    fn(arg, 0, count, 0);
    return;
  }
  pool->fn = fn;
  pool->arg = arg;
  pool->count = count;
  pool->parts = parts;
  atomic_store_explicit(&pool->pending, pool->threads - 1, memory_order_relaxed);
  pthread_mutex_lock(&pool->lock); /* sleepers check generation under the lock */
  atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
  pthread_cond_broadcast(&pool->start);
  pthread_mutex_unlock(&pool->lock);
  run_part(pool, 0);
  for (int i = 0; i < SPINS && atomic_load_explicit(&pool->pending, memory_order_acquire) > 0; i++)
    pause_cpu();
  if (atomic_load_explicit(&pool->pending, memory_order_acquire) > 0) {
    pthread_mutex_lock(&pool->lock);
    while (atomic_load(&pool->pending) > 0) pthread_cond_wait(&pool->done, &pool->lock);
    pthread_mutex_unlock(&pool->lock);
  }
}
