/* context.c: library identity, contexts, errors and buffers of the CPU
 * backend. Device memory is host memory here; upload and download copy. */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cpu.h"

static _Thread_local char create_error[512];

int iq_abi_version(void) { return IQ_ABI_VERSION; }

const char *iq_backend_name(void) { return "cpu"; }

int iq_fail(iq_ctx *ctx, int status, const char *fmt, ...) {
  char *dst = ctx ? ctx->error : create_error;
  va_list args;
  va_start(args, fmt);
  vsnprintf(dst, sizeof ctx->error, fmt, args);
  va_end(args);
  return status;
}

const char *iq_last_error(const iq_ctx *ctx) {
  return ctx ? ctx->error : create_error;
}

int iq_ctx_create(int device, int threads, iq_ctx **out) {
  (void)device;
  if (!out) return iq_fail(NULL, IQ_ERR_ARG, "iq_ctx_create: out is NULL");
  *out = NULL;
  if (threads < 0 || threads > 1024)
    return iq_fail(NULL, IQ_ERR_ARG, "iq_ctx_create: threads %d not in [0, 1024]", threads);
  if (threads == 0) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    threads = cores > 0 ? (int)cores : 1;
  }
  iq_ctx *ctx = calloc(1, sizeof *ctx);
  if (!ctx) return iq_fail(NULL, IQ_ERR_MEMORY, "iq_ctx_create: out of memory");
  ctx->threads = threads;
  ctx->timing_start = -1;
  ctx->pool = iq_pool_create(threads);
  if (!ctx->pool) {
    free(ctx);
    return iq_fail(NULL, IQ_ERR_MEMORY, "iq_ctx_create: cannot start %d threads", threads);
  }
  *out = ctx;
  return IQ_OK;
}

void iq_ctx_destroy(iq_ctx *ctx) {
  if (!ctx) return;
  iq_pool_destroy(ctx->pool);
  free(ctx->scratch);
  free(ctx);
}

int iq_device_info(iq_ctx *ctx, char *name, int cap, uint64_t *free_bytes,
                   uint64_t *total_bytes) {
  if (!ctx || !name || cap <= 0 || !free_bytes || !total_bytes)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_device_info: NULL argument");
  snprintf(name, (size_t)cap, "CPU (%d threads)", ctx->threads);
  long pages = sysconf(_SC_PHYS_PAGES), avail = sysconf(_SC_AVPHYS_PAGES);
  long page = sysconf(_SC_PAGESIZE);
  *total_bytes = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 0;
  *free_bytes = avail > 0 && page > 0 ? (uint64_t)avail * (uint64_t)page : 0;
  return IQ_OK;
}

int iq_scratch(iq_ctx *ctx, size_t bytes, void **out) {
  if (bytes > ctx->scratch_bytes) {
    void *grown = malloc(bytes);
    if (!grown) return iq_fail(ctx, IQ_ERR_MEMORY, "cannot allocate %zu bytes of scratch", bytes);
    free(ctx->scratch);
    ctx->scratch = grown;
    ctx->scratch_bytes = bytes;
  }
  *out = ctx->scratch;
  return IQ_OK;
}

int iq_sync(iq_ctx *ctx) {
  return ctx ? IQ_OK : iq_fail(NULL, IQ_ERR_ARG, "iq_sync: ctx is NULL");
}

static double monotonic_seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Calls finish as issued here: a span is the host's time between the marks. */
int iq_timing_begin(iq_ctx *ctx) {
  if (!ctx) return iq_fail(NULL, IQ_ERR_ARG, "iq_timing_begin: ctx is NULL");
  if (ctx->timing_start >= 0) return iq_fail(ctx, IQ_ERR_ARG, "iq_timing_begin: a span is open already");
  ctx->timing_start = monotonic_seconds();
  return IQ_OK;
}

int iq_timing_end(iq_ctx *ctx, double *seconds) {
  if (!ctx || !seconds) return iq_fail(ctx, IQ_ERR_ARG, "iq_timing_end: NULL argument");
  if (ctx->timing_start < 0) return iq_fail(ctx, IQ_ERR_ARG, "iq_timing_end: no span is open");
  *seconds = monotonic_seconds() - ctx->timing_start;
  ctx->timing_start = -1;
  return IQ_OK;
}

int iq_alloc(iq_ctx *ctx, uint64_t bytes, void **out) {
  if (!ctx || !out) return iq_fail(ctx, IQ_ERR_ARG, "iq_alloc: NULL argument");
  *out = NULL;
  if (bytes == 0 || bytes > SIZE_MAX - 63)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_alloc: cannot allocate %llu bytes", (unsigned long long)bytes);
  /* 64-byte alignment suits every vector load; round the size up to match. */
  uint64_t rounded = (bytes + 63) & ~(uint64_t)63;
  void *p = aligned_alloc(64, (size_t)rounded);
  if (!p)
    return iq_fail(ctx, IQ_ERR_MEMORY, "iq_alloc: cannot allocate %llu bytes",
                   (unsigned long long)bytes);
  *out = p;
  return IQ_OK;
}

int iq_free(iq_ctx *ctx, void *buf) {
  if (!ctx) return iq_fail(NULL, IQ_ERR_ARG, "iq_free: ctx is NULL");
  free(buf);
  return IQ_OK;
}

int iq_upload(iq_ctx *ctx, void *dst, const void *host_src, uint64_t bytes) {
  if (!ctx || !dst || !host_src) return iq_fail(ctx, IQ_ERR_ARG, "iq_upload: NULL argument");
  memcpy(dst, host_src, (size_t)bytes);
  return IQ_OK;
}

int iq_download(iq_ctx *ctx, void *host_dst, const void *src, uint64_t bytes) {
  if (!ctx || !host_dst || !src) return iq_fail(ctx, IQ_ERR_ARG, "iq_download: NULL argument");
  memcpy(host_dst, src, (size_t)bytes);
  return IQ_OK;
}
