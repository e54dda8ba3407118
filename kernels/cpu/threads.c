/* threads.c: a persistent pool of worker threads. Decode calls dozens of small
 * ops per token, so threads are started once per context, not per op. The
 * calling thread does worker 0's share itself. */
#include <pthread.h>
#include <stdlib.h>

#include "cpu.h"

struct iq_pool {
  int threads;
  pthread_t *workers;
  pthread_mutex_t lock;
  pthread_cond_t start, done;
  uint64_t generation; /* bumped per job; workers wait for a new one */
  int pending;         /* workers not yet finished with this job */
  int stopping;
  /* the current job */
  iq_range_fn fn;
  void *arg;
  int64_t count;
  int parts;
};

typedef struct {
  iq_pool *pool;
  int index;
} worker_arg;

static void run_part(iq_pool *pool, int part) {
  int64_t begin = pool->count * part / pool->parts;
  int64_t end = pool->count * (part + 1) / pool->parts;
  if (begin < end) pool->fn(pool->arg, begin, end, part);
}

static void *worker_main(void *p) {
  worker_arg self = *(worker_arg *)p;
  free(p);
  iq_pool *pool = self.pool;
  uint64_t seen = 0;
  pthread_mutex_lock(&pool->lock);
  for (;;) {
    while (pool->generation == seen && !pool->stopping) pthread_cond_wait(&pool->start, &pool->lock);
    if (pool->stopping) break;
    seen = pool->generation;
    int part = self.index;
    int active = part < pool->parts;
    pthread_mutex_unlock(&pool->lock);
    if (active) run_part(pool, part);
    pthread_mutex_lock(&pool->lock);
    if (--pool->pending == 0) pthread_cond_signal(&pool->done);
  }
  pthread_mutex_unlock(&pool->lock);
  return NULL;
}

iq_pool *iq_pool_create(int threads) {
  iq_pool *pool = calloc(1, sizeof *pool);
  if (!pool) return NULL;
  pool->threads = threads;
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
  pool->stopping = 1;
  pthread_cond_broadcast(&pool->start);
  pthread_mutex_unlock(&pool->lock);
  for (int i = 1; i < pool->threads; i++) pthread_join(pool->workers[i], NULL);
  pthread_mutex_destroy(&pool->lock);
  pthread_cond_destroy(&pool->start);
  pthread_cond_destroy(&pool->done);
  free(pool->workers);
  free(pool);
}

void iq_parallel_for(iq_ctx *ctx, int64_t count, int64_t min_chunk,
                     iq_range_fn fn, void *arg) {
  iq_pool *pool = ctx->pool;
  if (count <= 0) return;
  if (min_chunk < 1) min_chunk = 1;
  int64_t by_size = count / min_chunk;
  int parts = by_size < pool->threads ? (int)(by_size > 0 ? by_size : 1) : pool->threads;
  if (parts == 1) {
    fn(arg, 0, count, 0);
    return;
  }
  pthread_mutex_lock(&pool->lock);
  pool->fn = fn;
  pool->arg = arg;
  pool->count = count;
  pool->parts = parts;
  pool->pending = pool->threads - 1;
  pool->generation++;
  pthread_cond_broadcast(&pool->start);
  pthread_mutex_unlock(&pool->lock);
  run_part(pool, 0);
  pthread_mutex_lock(&pool->lock);
  while (pool->pending > 0) pthread_cond_wait(&pool->done, &pool->lock);
  pthread_mutex_unlock(&pool->lock);
}
