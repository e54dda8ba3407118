# Builds the kernel library: build/libinnerq_cpu.so always, build/libinnerq_cuda.so where nvcc exists.
# cuBLAS is loaded at run time (dlopen), so the CUDA library builds where only nvcc is installed.
# No -march=native: the binaries must run on any x86-64 (this machine, CI, the GPU machine).
CC ?= gcc
NVCC ?= nvcc
CFLAGS ?= -O3
CFLAGS += -std=c11 -fPIC -pthread -Wall -Wextra -Werror -MMD -MP
NVCCFLAGS ?= -O3
NVCCFLAGS += -std=c++17 -Xcompiler -fPIC,-Wall -Ikernels \
	-gencode arch=compute_90a,code=sm_90a -gencode arch=compute_80,code=compute_80

CPU_SRC := $(wildcard kernels/cpu/*.c)
CPU_OBJ := $(CPU_SRC:kernels/cpu/%.c=build/cpu/%.o)
CUDA_SRC := $(wildcard kernels/cuda/*.cu)
CUDA_OBJ := $(CUDA_SRC:kernels/cuda/%.cu=build/cuda/%.o)

.PHONY: all cpu cuda clean test
all: cpu

cpu: build/libinnerq_cpu.so
cuda: build/libinnerq_cuda.so

build/libinnerq_cpu.so: $(CPU_OBJ)
	$(CC) -shared -pthread -o $@ $^ -lm

build/cpu/%.o: kernels/cpu/%.c kernels/innerq.h kernels/checks.h kernels/kvq.h | build/cpu
	$(CC) $(CFLAGS) -c -o $@ $<

build/libinnerq_cuda.so: $(CUDA_OBJ)
	$(NVCC) -shared -o $@ $^ -ldl

build/cuda/%.o: kernels/cuda/%.cu kernels/innerq.h kernels/checks.h kernels/kvq.h $(wildcard kernels/cuda/*.cuh) | build/cuda
	$(NVCC) $(NVCCFLAGS) -c -o $@ $<

# the quantizer rounds exactly as the C backend's (no fused multiply-adds), so both write the same codes
build/cuda/kvq_store.o: NVCCFLAGS += -fmad=false

build/cpu build/cuda:
	mkdir -p $@

# Installs Deno and the npm packages where missing, builds (CUDA too where nvcc exists), checks
# formatting and lint, and runs every test. GPU tests skip themselves where no GPU answers.
test:
	deno=$$(scripts/setup.sh) && $$deno fmt --check && $$deno lint && $$deno task test

clean:
	rm -rf build

-include $(CPU_OBJ:.o=.d)
