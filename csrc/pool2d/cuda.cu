// Max pooling (with argmax) and average pooling on CUDA, forward and backward, NCHW and NHWC.
// Forward: one thread per output element scans its window in row-major order (torch's order,
// so ties and NaNs resolve as in torch), accumulating in cuda_acc_t.
// Backward: one thread per input element gathers the gradients of the outputs whose window
// covers it (max: whose argmax is this element), in output order: deterministic, no atomics.
// Blocks of 256 threads, grid-stride loops over int64 element ids; NHWC ids run fastest over
// channels so a warp touches contiguous memory. Threads share nothing.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

#include "common/checks.h"
#include "common/cuda_compat.cuh"
#include "common/params.h"
#include "pool2d/pool2d.h"

namespace cnnext {
namespace {

using pool2d::Geometry;

constexpr int64_t kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride loops cover the rest

dim3 grid_for(int64_t elements) {
  return dim3(
      static_cast<unsigned int>(std::min<int64_t>(ceil_div(elements, kThreads), kMaxBlocks)));
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// Element id -> (sample or plane, row, column, channel) in either layout. NCHW: `outer` is the
// (n, c) plane and c is 0; NHWC: `outer` is n.
template <bool kChannelsLast>
__device__ __forceinline__ void split(int64_t id, int64_t c, int64_t h, int64_t w, int64_t* outer,
                                      int64_t* y, int64_t* x, int64_t* ch) {
  if constexpr (kChannelsLast) {
    *ch = id % c;
    id /= c;
  } else {
    *ch = 0;
  }
  *x = id % w;
  id /= w;
  *y = id % h;
  *outer = id / h;
}

// Offset of plane element `index` (= y * w + x) of `outer` in either layout.
template <bool kChannelsLast>
__device__ __forceinline__ int64_t offset(int64_t outer, int64_t index, int64_t ch, int64_t c,
                                          int64_t plane) {
  return kChannelsLast ? (outer * plane + index) * c + ch : outer * plane + index;
}

// ---- max pooling -------------------------------------------------------------------------------

template <typename scalar_t, bool kChannelsLast>
__global__ void max_pool2d_forward_kernel(const scalar_t* __restrict__ input,
                                          scalar_t* __restrict__ output,
                                          int64_t* __restrict__ argmax, Geometry g, int64_t total) {
  using acc_t = cuda_acc_t<scalar_t>;
  const int64_t plane = g.h * g.w;
  for (int64_t id = global_thread(); id < total; id += grid_threads()) {
    int64_t outer, oh, ow, ch;
    split<kChannelsLast>(id, g.c, g.h_out, g.w_out, &outer, &oh, &ow, &ch);
    const int64_t ih0 = oh * g.sh - g.ph, iw0 = ow * g.sw - g.pw;
    const int64_t ih_first = pool2d::first_tap(ih0, g.dh), iw_first = pool2d::first_tap(iw0, g.dw);
    const int64_t ih_end = pool2d::end_tap(ih0, g.kh, g.dh, g.h);
    const int64_t iw_end = pool2d::end_tap(iw0, g.kw, g.dw, g.w);
    acc_t best = -std::numeric_limits<acc_t>::infinity();
    int64_t best_index = ih_first * g.w + iw_first;
    for (int64_t ih = ih_first; ih < ih_end; ih += g.dh) {
      for (int64_t iw = iw_first; iw < iw_end; iw += g.dw) {
        const int64_t index = ih * g.w + iw;
        const acc_t v =
            static_cast<acc_t>(input[offset<kChannelsLast>(outer, index, ch, g.c, plane)]);
        if (pool2d::max_takes(v, best)) {
          best = v;
          best_index = index;
        }
      }
    }
    output[id] = static_cast<scalar_t>(best);
    argmax[id] = best_index;
  }
}

template <typename scalar_t, bool kChannelsLast>
__global__ void max_pool2d_backward_kernel(const scalar_t* __restrict__ grad_output,
                                           const int64_t* __restrict__ argmax,
                                           scalar_t* __restrict__ grad_input, Geometry g,
                                           int64_t total) {
  using acc_t = cuda_acc_t<scalar_t>;
  const int64_t plane_out = g.h_out * g.w_out;
  for (int64_t id = global_thread(); id < total; id += grid_threads()) {
    int64_t outer, ih, iw, ch;
    split<kChannelsLast>(id, g.c, g.h, g.w, &outer, &ih, &iw, &ch);
    int64_t oh_begin, oh_end, ow_begin, ow_end;
    pool2d::covering_outputs(ih, g.kh, g.sh, g.ph, g.dh, g.h_out, &oh_begin, &oh_end);
    pool2d::covering_outputs(iw, g.kw, g.sw, g.pw, g.dw, g.w_out, &ow_begin, &ow_end);
    const int64_t index = ih * g.w + iw;
    acc_t sum = 0;
    for (int64_t oh = oh_begin; oh < oh_end; ++oh) {
      for (int64_t ow = ow_begin; ow < ow_end; ++ow) {
        const int64_t o = offset<kChannelsLast>(outer, oh * g.w_out + ow, ch, g.c, plane_out);
        if (argmax[o] == index) sum += static_cast<acc_t>(grad_output[o]);
      }
    }
    grad_input[id] = static_cast<scalar_t>(sum);
  }
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_with_argmax_cuda(
    const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  CNNEXT_DEVICE_GUARD(input);
  const pool2d::ForwardPlan plan = pool2d::plan_max_forward(
      pool2d::Backend::kCuda, input, kernel_size, stride, padding, dilation, ceil_mode);
  if (plan.empty()) return {plan.output, plan.argmax};
  const int64_t total = plan.output.numel();
  const Geometry& g = plan.g;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, plan.input.scalar_type(), "max_pool2d_with_argmax_cuda", [&] {
        const scalar_t* in = plan.input.const_data_ptr<scalar_t>();
        scalar_t* out = plan.output.mutable_data_ptr<scalar_t>();
        int64_t* arg = plan.argmax.mutable_data_ptr<int64_t>();
        if (plan.channels_last) {
          CNNEXT_LAUNCH((max_pool2d_forward_kernel<scalar_t, true>), grid_for(total),
                        dim3(kThreads), 0, current_stream(), in, out, arg, g, total);
        } else {
          CNNEXT_LAUNCH((max_pool2d_forward_kernel<scalar_t, false>), grid_for(total),
                        dim3(kThreads), 0, current_stream(), in, out, arg, g, total);
        }
      });
  return {plan.output, plan.argmax};
}

at::Tensor max_pool2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& argmax,
                                    at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, bool ceil_mode) {
  CNNEXT_DEVICE_GUARD(grad_output);
  const pool2d::BackwardPlan plan =
      pool2d::plan_max_backward(pool2d::Backend::kCuda, grad_output, argmax, input_size,
                                kernel_size, stride, padding, dilation, ceil_mode);
  if (plan.empty()) return plan.grad_input;
  const int64_t total = plan.grad_input.numel();
  const Geometry& g = plan.g;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, plan.grad_output.scalar_type(), "max_pool2d_backward_cuda", [&] {
        const scalar_t* grad = plan.grad_output.const_data_ptr<scalar_t>();
        const int64_t* arg = plan.argmax.const_data_ptr<int64_t>();
        scalar_t* out = plan.grad_input.mutable_data_ptr<scalar_t>();
        if (plan.channels_last) {
          CNNEXT_LAUNCH((max_pool2d_backward_kernel<scalar_t, true>), grid_for(total),
                        dim3(kThreads), 0, current_stream(), grad, arg, out, g, total);
        } else {
          CNNEXT_LAUNCH((max_pool2d_backward_kernel<scalar_t, false>), grid_for(total),
                        dim3(kThreads), 0, current_stream(), grad, arg, out, g, total);
        }
      });
  return plan.grad_input;
}

// ---- average pooling ---------------------------------------------------------------------------

template <typename scalar_t, bool kChannelsLast>
__global__ void avg_pool2d_forward_kernel(const scalar_t* __restrict__ input,
                                          scalar_t* __restrict__ output, Geometry g,
                                          bool count_include_pad, int64_t divisor_override,
                                          int64_t total) {
  using acc_t = cuda_acc_t<scalar_t>;
  const int64_t plane = g.h * g.w;
  for (int64_t id = global_thread(); id < total; id += grid_threads()) {
    int64_t outer, oh, ow, ch;
    split<kChannelsLast>(id, g.c, g.h_out, g.w_out, &outer, &oh, &ow, &ch);
    const int64_t ih0 = oh * g.sh - g.ph, iw0 = ow * g.sw - g.pw;
    const int64_t ih_begin = std::max<int64_t>(ih0, 0), ih_end = std::min(ih0 + g.kh, g.h);
    const int64_t iw_begin = std::max<int64_t>(iw0, 0), iw_end = std::min(iw0 + g.kw, g.w);
    if (ih_begin >= ih_end || iw_begin >= iw_end) {
      output[id] = static_cast<scalar_t>(0);  // a window entirely in the padding
      continue;
    }
    acc_t sum = 0;
    for (int64_t ih = ih_begin; ih < ih_end; ++ih) {
      for (int64_t iw = iw_begin; iw < iw_end; ++iw) {
        sum +=
            static_cast<acc_t>(input[offset<kChannelsLast>(outer, ih * g.w + iw, ch, g.c, plane)]);
      }
    }
    const int64_t divisor = pool2d::avg_divisor(g, ih0, iw0, count_include_pad, divisor_override);
    output[id] = static_cast<scalar_t>(sum / static_cast<acc_t>(divisor));
  }
}

template <typename scalar_t, bool kChannelsLast>
__global__ void avg_pool2d_backward_kernel(const scalar_t* __restrict__ grad_output,
                                           scalar_t* __restrict__ grad_input, Geometry g,
                                           bool count_include_pad, int64_t divisor_override,
                                           int64_t total) {
  using acc_t = cuda_acc_t<scalar_t>;
  const int64_t plane_out = g.h_out * g.w_out;
  for (int64_t id = global_thread(); id < total; id += grid_threads()) {
    int64_t outer, ih, iw, ch;
    split<kChannelsLast>(id, g.c, g.h, g.w, &outer, &ih, &iw, &ch);
    int64_t oh_begin, oh_end, ow_begin, ow_end;
    pool2d::covering_outputs(ih, g.kh, g.sh, g.ph, 1, g.h_out, &oh_begin, &oh_end);
    pool2d::covering_outputs(iw, g.kw, g.sw, g.pw, 1, g.w_out, &ow_begin, &ow_end);
    acc_t sum = 0;
    for (int64_t oh = oh_begin; oh < oh_end; ++oh) {
      for (int64_t ow = ow_begin; ow < ow_end; ++ow) {
        const int64_t divisor = pool2d::avg_divisor(g, oh * g.sh - g.ph, ow * g.sw - g.pw,
                                                    count_include_pad, divisor_override);
        const int64_t o = offset<kChannelsLast>(outer, oh * g.w_out + ow, ch, g.c, plane_out);
        sum += static_cast<acc_t>(grad_output[o]) / static_cast<acc_t>(divisor);
      }
    }
    grad_input[id] = static_cast<scalar_t>(sum);
  }
}

at::Tensor avg_pool2d_cuda(const at::Tensor& input, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                           bool count_include_pad, std::optional<int64_t> divisor_override) {
  CNNEXT_DEVICE_GUARD(input);
  const pool2d::ForwardPlan plan = pool2d::plan_avg_forward(
      pool2d::Backend::kCuda, input, kernel_size, stride, padding, ceil_mode, divisor_override);
  if (plan.empty()) return plan.output;
  const int64_t total = plan.output.numel();
  const Geometry& g = plan.g;
  const int64_t divisor = divisor_override.value_or(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, plan.input.scalar_type(), "avg_pool2d_cuda", [&] {
        const scalar_t* in = plan.input.const_data_ptr<scalar_t>();
        scalar_t* out = plan.output.mutable_data_ptr<scalar_t>();
        if (plan.channels_last) {
          CNNEXT_LAUNCH((avg_pool2d_forward_kernel<scalar_t, true>), grid_for(total),
                        dim3(kThreads), 0, current_stream(), in, out, g, count_include_pad, divisor,
                        total);
        } else {
          CNNEXT_LAUNCH((avg_pool2d_forward_kernel<scalar_t, false>), grid_for(total),
                        dim3(kThreads), 0, current_stream(), in, out, g, count_include_pad, divisor,
                        total);
        }
      });
  return plan.output;
}

at::Tensor avg_pool2d_backward_cuda(const at::Tensor& grad_output, at::IntArrayRef input_size,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                                    std::optional<int64_t> divisor_override) {
  CNNEXT_DEVICE_GUARD(grad_output);
  const pool2d::BackwardPlan plan =
      pool2d::plan_avg_backward(pool2d::Backend::kCuda, grad_output, input_size, kernel_size,
                                stride, padding, ceil_mode, divisor_override);
  if (plan.empty()) return plan.grad_input;
  const int64_t total = plan.grad_input.numel();
  const Geometry& g = plan.g;
  const int64_t divisor = divisor_override.value_or(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, plan.grad_output.scalar_type(), "avg_pool2d_backward_cuda", [&] {
        const scalar_t* grad = plan.grad_output.const_data_ptr<scalar_t>();
        scalar_t* out = plan.grad_input.mutable_data_ptr<scalar_t>();
        if (plan.channels_last) {
          CNNEXT_LAUNCH((avg_pool2d_backward_kernel<scalar_t, true>), grid_for(total),
                        dim3(kThreads), 0, current_stream(), grad, out, g, count_include_pad,
                        divisor, total);
        } else {
          CNNEXT_LAUNCH((avg_pool2d_backward_kernel<scalar_t, false>), grid_for(total),
                        dim3(kThreads), 0, current_stream(), grad, out, g, count_include_pad,
                        divisor, total);
        }
      });
  return plan.grad_input;
}

}  // namespace
}  // namespace cnnext

CNNEXT_CUDA_IMPL(m) {
  m.impl("max_pool2d_with_argmax", &cnnext::max_pool2d_with_argmax_cuda);
  m.impl("max_pool2d_backward", &cnnext::max_pool2d_backward_cuda);
  m.impl("avg_pool2d", &cnnext::avg_pool2d_cuda);
  m.impl("avg_pool2d_backward", &cnnext::avg_pool2d_backward_cuda);
}
