/* context.cu: library identity, contexts, errors, scratch, cuBLAS loading and
 * buffers of the CUDA backend (the twin of kernels/cpu/context.c). Buffers are
 * cudaMalloc'd device memory; every op runs on the context's one stream. */
#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "cuda.cuh"

static thread_local char create_error[512];

extern "C" int iq_abi_version(void) { return IQ_ABI_VERSION; }

extern "C" const char *iq_backend_name(void) { return "cuda"; }

int iq_fail(iq_ctx *ctx, int status, const char *fmt, ...) {
  char *dst = ctx ? ctx->error : create_error;
  va_list args;
  va_start(args, fmt);
  vsnprintf(dst, sizeof create_error, fmt, args);
  va_end(args);
  return status;
}

extern "C" const char *iq_last_error(const iq_ctx *ctx) { return ctx ? ctx->error : create_error; }

extern "C" void iq_ctx_destroy(iq_ctx *ctx) {
  if (!ctx) return;
  /* Best effort: the context goes whatever fails here. */
  cudaSetDevice(ctx->device);
  iq_release_hold(ctx);
  if (ctx->stream) cudaStreamSynchronize(ctx->stream);
  if (ctx->cublas.handle) ctx->cublas.destroy(ctx->cublas.handle);
  if (ctx->cublas.lib) dlclose(ctx->cublas.lib);
  cudaFree(ctx->scratch);
  cudaFreeHost(ctx->fault);
  cudaFreeHost(ctx->hold);
  for (cudaEvent_t mark : ctx->marks)
    if (mark) cudaEventDestroy(mark);
  if (ctx->stream) cudaStreamDestroy(ctx->stream);
  free(ctx);
}

/* Fails iq_ctx_create with "no CUDA device: ..." or the failed call. */
#define CREATE_CHECK(call, what)                                                               \
  do {                                                                                         \
    cudaError_t e_ = (call);                                                                   \
    if (e_ != cudaSuccess) {                                                                   \
      iq_ctx_destroy(ctx);                                                                     \
      return iq_fail(NULL, IQ_ERR_DEVICE, "%s: %s", what, cudaGetErrorString(e_));             \
    }                                                                                          \
  } while (0)

extern "C" int iq_ctx_create(int device, int threads, iq_ctx **out) {
  (void)threads;
  if (!out) return iq_fail(NULL, IQ_ERR_ARG, "iq_ctx_create: out is NULL");
  *out = NULL;
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) return iq_fail(NULL, IQ_ERR_DEVICE, "no CUDA device: %s", cudaGetErrorString(e));
  if (count == 0) return iq_fail(NULL, IQ_ERR_DEVICE, "no CUDA device: the driver reports none");
  if (device < 0 || device >= count)
    return iq_fail(NULL, IQ_ERR_ARG, "iq_ctx_create: device %d not in [0, %d)", device, count);
  iq_ctx *ctx = (iq_ctx *)calloc(1, sizeof *ctx);
  if (!ctx) return iq_fail(NULL, IQ_ERR_MEMORY, "iq_ctx_create: out of memory");
  ctx->device = device;
  CREATE_CHECK(cudaSetDevice(device), "iq_ctx_create: cudaSetDevice");
  CREATE_CHECK(cudaDeviceGetAttribute(&ctx->sms, cudaDevAttrMultiProcessorCount, device),
               "iq_ctx_create: cudaDeviceGetAttribute");
  CREATE_CHECK(cudaDeviceGetAttribute(&ctx->cc_major, cudaDevAttrComputeCapabilityMajor, device),
               "iq_ctx_create: cudaDeviceGetAttribute");
  CREATE_CHECK(cudaStreamCreateWithFlags(&ctx->stream, cudaStreamNonBlocking),
               "iq_ctx_create: cudaStreamCreate");
  CREATE_CHECK(cudaHostAlloc((void **)&ctx->fault, sizeof *ctx->fault, cudaHostAllocMapped),
               "iq_ctx_create: cudaHostAlloc");
  ctx->fault->seen = 0;
  CREATE_CHECK(cudaHostGetDevicePointer((void **)&ctx->fault_dev, ctx->fault, 0),
               "iq_ctx_create: cudaHostGetDevicePointer");
  *out = ctx;
  return IQ_OK;
}

int iq_scratch(iq_ctx *ctx, size_t bytes, void **out) {
  if (bytes > ctx->scratch_bytes) {
    /* Kernels still queued may use the old buffer: wait for them before freeing. */
    iq_release_hold(ctx);
    IQ_CUDA(ctx, cudaStreamSynchronize(ctx->stream));
    IQ_CUDA(ctx, cudaFree(ctx->scratch));
    ctx->scratch = NULL;
    ctx->scratch_bytes = 0;
    size_t grown = (bytes + ((size_t)1 << 20) - 1) & ~(((size_t)1 << 20) - 1);
    if (cudaMalloc(&ctx->scratch, grown) != cudaSuccess) {
      cudaGetLastError();
      return iq_fail(ctx, IQ_ERR_MEMORY, "scratch: cannot allocate %zu bytes of device memory",
                     grown);
    }
    ctx->scratch_bytes = grown;
  }
  *out = ctx->scratch;
  return IQ_OK;
}

template <typename F> static void symbol(void *lib, const char *name, F *fn) {
  *fn = reinterpret_cast<F>(dlsym(lib, name));
}

/* The cuBLAS library: $INNERQ_CUBLAS if set, else the loader's search path. */
int iq_cublas(iq_ctx *ctx, struct iq_cublas **out) {
  struct iq_cublas *cb = &ctx->cublas;
  if (cb->handle) {
    *out = cb;
    return IQ_OK;
  }
  if (!cb->lib) {
    const char *env = getenv("INNERQ_CUBLAS");
    const char *names[] = {env, "libcublas.so.13", "libcublas.so"};
    for (const char *name : names)
      if (name && (cb->lib = dlopen(name, RTLD_NOW | RTLD_LOCAL))) break;
    if (!cb->lib)
      return iq_fail(ctx, IQ_ERR_DEVICE,
                     "cuBLAS not found (libcublas.so.13): put its folder (pip's nvidia-cublas "
                     "has it in site-packages/nvidia/cu13/lib) on LD_LIBRARY_PATH or set "
                     "INNERQ_CUBLAS to the file");
  }
  cublasStatus_t (*create)(cublasHandle_t *), (*set_stream)(cublasHandle_t, cudaStream_t);
  symbol(cb->lib, "cublasCreate_v2", &create);
  symbol(cb->lib, "cublasSetStream_v2", &set_stream);
  symbol(cb->lib, "cublasDestroy_v2", &cb->destroy);
  symbol(cb->lib, "cublasGemmEx", &cb->gemm_ex);
  symbol(cb->lib, "cublasGetStatusString", &cb->status_string);
  if (!create || !set_stream || !cb->destroy || !cb->gemm_ex || !cb->status_string)
    return iq_fail(ctx, IQ_ERR_DEVICE, "cuBLAS: a symbol is missing (%s)", dlerror());
  cublasHandle_t handle;
  cublasStatus_t s = create(&handle);
  if (s != 0) return iq_fail(ctx, IQ_ERR_DEVICE, "cublasCreate: %s", cb->status_string(s));
  if ((s = set_stream(handle, ctx->stream)) != 0) {
    cb->destroy(handle);
    return iq_fail(ctx, IQ_ERR_DEVICE, "cublasSetStream: %s", cb->status_string(s));
  }
  cb->handle = handle;
  *out = cb;
  return IQ_OK;
}

extern "C" int iq_device_info(iq_ctx *ctx, char *name, int cap, uint64_t *free_bytes,
                              uint64_t *total_bytes) {
  if (!ctx || !name || cap <= 0 || !free_bytes || !total_bytes)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_device_info: NULL argument");
  cudaDeviceProp prop;
  IQ_CUDA(ctx, cudaGetDeviceProperties(&prop, ctx->device));
  snprintf(name, (size_t)cap, "%s", prop.name);
  size_t free_mem = 0, total_mem = 0;
  IQ_CUDA(ctx, cudaSetDevice(ctx->device));
  IQ_CUDA(ctx, cudaMemGetInfo(&free_mem, &total_mem));
  *free_bytes = free_mem;
  *total_bytes = total_mem;
  return IQ_OK;
}

/* Waits for the stream, then reports what a kernel recorded in ctx->fault. */
static int finish(iq_ctx *ctx, const char *op) {
  iq_release_hold(ctx);
  cudaError_t e = cudaStreamSynchronize(ctx->stream);
  if (e != cudaSuccess)
    return iq_fail(ctx, IQ_ERR_DEVICE, "%s: cudaStreamSynchronize: %s", op, cudaGetErrorString(e));
  volatile struct iq_fault *f = ctx->fault;
  if (f->seen) {
    f->seen = 0;
    return iq_fail(ctx, IQ_ERR_ARG, "%s: an earlier iq_embed read token id %d, outside [0, %d)",
                   op, f->bad_token, f->vocab);
  }
  return IQ_OK;
}

extern "C" int iq_sync(iq_ctx *ctx) {
  if (!ctx) return iq_fail(NULL, IQ_ERR_ARG, "iq_sync: ctx is NULL");
  return finish(ctx, "iq_sync");
}

/* Spins until the host releases it, or says that it gave up after a second: the calls queued
 * behind it meanwhile then run back to back. */
static __global__ void hold_kernel(volatile iq_hold *hold) {
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    if (hold->release) return;
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < 1000000000ull);
  hold->timed_out = 1;
}

extern "C" int iq_timing_begin(iq_ctx *ctx) {
  if (!ctx) return iq_fail(NULL, IQ_ERR_ARG, "iq_timing_begin: ctx is NULL");
  if (ctx->timing) return iq_fail(ctx, IQ_ERR_ARG, "iq_timing_begin: a span is open already");
  if (!ctx->hold) {
    for (cudaEvent_t &mark : ctx->marks) IQ_CUDA(ctx, cudaEventCreate(&mark));
    IQ_CUDA(ctx, cudaHostAlloc((void **)&ctx->hold, sizeof *ctx->hold, cudaHostAllocMapped));
    IQ_CUDA(ctx, cudaHostGetDevicePointer((void **)&ctx->hold_dev, ctx->hold, 0));
  }
  ctx->hold->release = 0; /* the last hold kernel has returned: its span's end waited for it */
  ctx->hold->timed_out = 0;
  hold_kernel<<<1, 1, 0, ctx->stream>>>(ctx->hold_dev);
  IQ_LAUNCHED(ctx);
  IQ_CUDA(ctx, cudaEventRecord(ctx->marks[0], ctx->stream));
  ctx->timing = 1;
  return IQ_OK;
}

extern "C" int iq_timing_end(iq_ctx *ctx, double *seconds) {
  if (!ctx || !seconds) return iq_fail(ctx, IQ_ERR_ARG, "iq_timing_end: NULL argument");
  if (!ctx->timing) return iq_fail(ctx, IQ_ERR_ARG, "iq_timing_end: no span is open");
  ctx->timing = 0;
  const cudaError_t recorded = cudaEventRecord(ctx->marks[1], ctx->stream);
  iq_release_hold(ctx); /* whatever failed, the device stops waiting */
  IQ_CUDA(ctx, recorded);
  IQ_CUDA(ctx, cudaEventSynchronize(ctx->marks[1]));
  if (((volatile iq_hold *)ctx->hold)->timed_out)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_timing_end: the device waited a second for the span's "
                                    "calls to be issued; time fewer at once");
  float ms = 0.0f;
  IQ_CUDA(ctx, cudaEventElapsedTime(&ms, ctx->marks[0], ctx->marks[1]));
  *seconds = ms * 1e-3;
  return IQ_OK;
}

extern "C" int iq_alloc(iq_ctx *ctx, uint64_t bytes, void **out) {
  if (!ctx || !out) return iq_fail(ctx, IQ_ERR_ARG, "iq_alloc: NULL argument");
  *out = NULL;
  if (bytes == 0) return iq_fail(ctx, IQ_ERR_ARG, "iq_alloc: zero bytes");
  iq_release_hold(ctx); /* cudaMalloc may wait for the device */
  IQ_CUDA(ctx, cudaSetDevice(ctx->device));
  /* Rounded to 64 bytes like the CPU backend; cudaMalloc aligns to 256. */
  uint64_t rounded = (bytes + 63) & ~(uint64_t)63;
  cudaError_t e = cudaMalloc(out, (size_t)rounded);
  if (e != cudaSuccess) {
    cudaGetLastError(); /* an allocation failure is not sticky: clear it */
    *out = NULL;
    return iq_fail(ctx, IQ_ERR_MEMORY, "iq_alloc: cannot allocate %llu bytes: %s",
                   (unsigned long long)bytes, cudaGetErrorString(e));
  }
  return IQ_OK;
}

extern "C" int iq_free(iq_ctx *ctx, void *buf) {
  if (!ctx) return iq_fail(NULL, IQ_ERR_ARG, "iq_free: ctx is NULL");
  iq_release_hold(ctx);
  /* cudaFree waits for the device, so kernels still using buf finish first. */
  IQ_CUDA(ctx, cudaFree(buf));
  return IQ_OK;
}

extern "C" int iq_upload(iq_ctx *ctx, void *dst, const void *host_src, uint64_t bytes) {
  if (!ctx || !dst || !host_src) return iq_fail(ctx, IQ_ERR_ARG, "iq_upload: NULL argument");
  if (bytes == 0) return IQ_OK;
  /* The caller may reuse host_src at once, so the copy completes before returning. */
  IQ_CUDA(ctx, cudaMemcpyAsync(dst, host_src, (size_t)bytes, cudaMemcpyHostToDevice, ctx->stream));
  iq_release_hold(ctx);
  IQ_CUDA(ctx, cudaStreamSynchronize(ctx->stream));
  return IQ_OK;
}

extern "C" int iq_download(iq_ctx *ctx, void *host_dst, const void *src, uint64_t bytes) {
  if (!ctx || !host_dst || !src) return iq_fail(ctx, IQ_ERR_ARG, "iq_download: NULL argument");
  if (bytes > 0)
    IQ_CUDA(ctx, cudaMemcpyAsync(host_dst, src, (size_t)bytes, cudaMemcpyDeviceToHost, ctx->stream));
  return finish(ctx, "iq_download");
}
