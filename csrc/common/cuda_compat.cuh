// Portability between the real CUDA build (nvcc) and the emulator build (g++, CPU tensors).
// Host code in every cuda.cu is shared by both builds; only the stream, the device guard, the
// launch syntax and the op namespace differ, and they all live here.
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <utility>

#include "common/library.h"

#ifdef CNNEXT_CUDA_EMULATION
#include "emu/emu.h"

// Emulated CUDA kernels serve CPU tensors in their own namespace.
#define CNNEXT_CUDA_IMPL(m) CNNEXT_LIBRARY_IMPL_EXPAND(cnnext_emu, CPU, m)
#define CNNEXT_DEVICE_GUARD(tensor) (void)0
#define CNNEXT_KERNEL_LAUNCH_CHECK() (void)0

namespace cnnext {
inline cudaStream_t current_stream() { return nullptr; }

template <typename... KernelArgs, typename... Args>
void launch_kernel(const char* name, void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                   std::size_t smem, cudaStream_t /*stream*/, Args&&... args) {
  auto body = [&]() { kernel(args...); };
  emu::launch(name, grid, block, smem, body);
}
}  // namespace cnnext

#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#define CNNEXT_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(cnnext, CUDA, m)
#define CNNEXT_DEVICE_GUARD(tensor) \
  const at::cuda::OptionalCUDAGuard cnnext_device_guard_(at::device_of(tensor))
#define CNNEXT_KERNEL_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define CNNEXT_DYNAMIC_SHARED(T, name)                         \
  extern __shared__ __align__(16) unsigned char name##_raw_[]; \
  T* name = reinterpret_cast<T*>(name##_raw_)

namespace cnnext {
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }

template <typename... KernelArgs, typename... Args>
void launch_kernel(const char* /*name*/, void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                   std::size_t smem, cudaStream_t stream, Args&&... args) {
  // clang-format splits the CUDA chevrons into "> > >", which nvcc rejects.
  // clang-format off
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  // clang-format on
}
}  // namespace cnnext
#endif

// The one way to launch a kernel. Wrap a template kernel in parentheses:
//   CNNEXT_LAUNCH((my_kernel<scalar_t, 4>), grid, block, smem, stream, arg0, arg1);
#define CNNEXT_LAUNCH(kernel, grid, block, smem, stream, ...)                         \
  do {                                                                                \
    ::cnnext::launch_kernel(#kernel, kernel, grid, block, smem, stream, __VA_ARGS__); \
    CNNEXT_KERNEL_LAUNCH_CHECK();                                                     \
  } while (0)

namespace cnnext {
// Accumulate as CUDA does (float for half/bfloat16/float, double for double), also under the
// emulator, so emulated numerics match the GPU's rather than the CPU's double accumulation.
template <typename scalar_t>
using cuda_acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;

inline unsigned int ceil_div(std::int64_t a, std::int64_t b) {
  return static_cast<unsigned int>((a + b - 1) / b);
}
}  // namespace cnnext
