// Planted-bug kernels for the sanitizer builds of the emulator extension (cnnext._C_emu_asan and
// _C_emu_tsan only; setup.py adds this file to those builds and to no other). They prove that a
// bug in an emulated kernel is reported through the same path the op tests take: Python, torch
// tensors, CNNEXT_LAUNCH, the sanitizer runtime preloaded into the interpreter. Each planted
// kernel has a correct twin that must run without a report. They live in their own namespace,
// torch.ops.cnnext_planted, never in cnnext or cnnext_emu:
//   torch.ops.cnnext_planted.run(case, x) -> Tensor          (x: float32, 1D, contiguous)
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <string>

#include "common/checks.h"
#include "common/cuda_compat.cuh"

namespace cnnext {
// In an anonymous namespace, as op kernels are: GCC gives no ASan redzones to the static locals
// (shared memory) of a template with vague (COMDAT) linkage.
namespace {

constexpr int64_t kBlock = 64;

// out[i] = 2 x[i]. Planted: the bound is one too large, so the last thread reads x[n] and writes
// out[n], one element past the tensors' storage (ASan: heap-buffer-overflow).
template <typename scalar_t, bool kOverflow>
__global__ void scale_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                             int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n + (kOverflow ? 1 : 0)) out[i] = 2 * x[i];
}

// out[i] = x[next in block]. Planted: thread 63 writes s[64], past the shared array
// (ASan: global-buffer-overflow, shared memory being plain static storage in that build).
template <typename scalar_t, bool kOverflow>
__global__ void shared_shift_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                    int64_t n) {
  __shared__ scalar_t s[kBlock];
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  s[threadIdx.x + (kOverflow ? 1 : 0)] = i < n ? x[i] : scalar_t(0);
  __syncthreads();
  if (i < n) out[i] = s[(threadIdx.x + 1) % kBlock];
}

// out[i] = x[i] + x[i - 1], the left neighbour read from shared memory. Planted: no barrier
// between the write and the neighbour's read (TSan: data race; the cooperative fibers may still
// give the right answer in forward order).
template <typename scalar_t, bool kBarrier>
__global__ void stencil_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                               int64_t n) {
  __shared__ scalar_t s[kBlock];
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  s[threadIdx.x] = i < n ? x[i] : scalar_t(0);
  if (kBarrier) __syncthreads();
  const scalar_t left = threadIdx.x > 0 ? s[threadIdx.x - 1] : (i > 0 && i - 1 < n ? x[i - 1] : 0);
  if (i < n) out[i] = s[threadIdx.x] + left;
}

// Counts of floor(|x|) mod 8 in a shared histogram. Planted: a plain += instead of atomicAdd
// (TSan: data race; fibers never interleave inside `+=`, so the counts are right).
template <typename scalar_t, bool kAtomic>
__global__ void histogram_kernel(const scalar_t* __restrict__ x, int* __restrict__ hist,
                                 int64_t n) {
  __shared__ int local[8];
  if (threadIdx.x < 8) local[threadIdx.x] = 0;
  __syncthreads();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int bin = static_cast<int>(static_cast<int64_t>(std::abs(x[i])) % 8);
    if (kAtomic) {
      atomicAdd(&local[bin], 1);
    } else {
      local[bin] += 1;
    }
  }
  __syncthreads();
  if (threadIdx.x < 8) atomicAdd(&hist[threadIdx.x], local[threadIdx.x]);
}

// Even and odd threads wait at different barriers: the launch fails (an error, not a crash), and
// the threads left waiting must unwind cleanly under either sanitizer.
template <typename scalar_t>
__global__ void divergent_barrier_kernel(scalar_t* __restrict__ out) {
  out[threadIdx.x] = 1;
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

at::Tensor planted_run(c10::string_view which, const at::Tensor& x) {
  const char* op = "cnnext_planted::run";
  CNNEXT_CHECK(x.scalar_type() == at::kFloat && x.dim() == 1 && x.is_contiguous(), op,
               "expected a contiguous 1D float32 tensor");
  const std::string c(which);
  const int64_t n = x.numel();
  CNNEXT_CHECK(n > 0, op, "expected a non-empty tensor");
  const dim3 grid(ceil_div(n, kBlock)), block(kBlock);
  const float* in = x.const_data_ptr<float>();
  auto stream = current_stream();
  if (c == "histogram" || c == "histogram_missing_atomic") {
    at::Tensor hist = at::zeros({8}, x.options().dtype(at::kInt));
    int* h = hist.mutable_data_ptr<int>();
    if (c == "histogram") {
      CNNEXT_LAUNCH((histogram_kernel<float, true>), dim3(2), block, 0, stream, in, h, n);
    } else {
      CNNEXT_LAUNCH((histogram_kernel<float, false>), dim3(2), block, 0, stream, in, h, n);
    }
    return hist;
  }
  at::Tensor out = at::empty_like(x);
  float* o = out.mutable_data_ptr<float>();
  if (c == "scale") {
    CNNEXT_LAUNCH((scale_kernel<float, false>), grid, block, 0, stream, in, o, n);
  } else if (c == "scale_global_overflow") {
    CNNEXT_LAUNCH((scale_kernel<float, true>), grid, block, 0, stream, in, o, n);
  } else if (c == "shared_shift") {
    CNNEXT_LAUNCH((shared_shift_kernel<float, false>), grid, block, 0, stream, in, o, n);
  } else if (c == "shared_shift_overflow") {
    CNNEXT_LAUNCH((shared_shift_kernel<float, true>), grid, block, 0, stream, in, o, n);
  } else if (c == "stencil") {
    CNNEXT_LAUNCH((stencil_kernel<float, true>), grid, block, 0, stream, in, o, n);
  } else if (c == "stencil_missing_barrier") {
    CNNEXT_LAUNCH((stencil_kernel<float, false>), grid, block, 0, stream, in, o, n);
  } else if (c == "divergent_barrier") {
    CNNEXT_LAUNCH((divergent_barrier_kernel<float>), dim3(1), block, 0, stream, o);
  } else {
    CNNEXT_CHECK(false, op, "unknown case '", c, "'");
  }
  return out;
}

}  // namespace
}  // namespace cnnext

TORCH_LIBRARY(cnnext_planted, m) {
  m.def("run(str case, Tensor x) -> Tensor", &cnnext::planted_run);
}
